"""The memory benchmark: chunked forward+backward needs <= 1/8 of the naive temp bytes
at Llama-3.2-1B's head size (compiled for CPU from abstract shapes; nothing of that
size is allocated)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_ratio_at_full_size():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "logprob_memory.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=600,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) >= {"naive_temp_bytes", "chunked_temp_bytes", "ratio"}
    assert result["shape"] == {
        "batch": 8, "seq": 2048, "hidden": 2048, "vocab": 128256, "dtype": "bfloat16"
    }
    # the naive path holds several [8, 2048, 128256] float32 arrays (8.4 GB each)
    assert result["naive_temp_bytes"] > 8 * 2048 * 128256 * 4
    assert result["ratio"] <= 1 / 8, result
