"""benchmarks/step_throughput.py: the whole harness (matmul peak, our step, the
eager peer) at a tiny size on one CPU device, in a subprocess as it runs on a GPU;
and its pure helpers.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cpu_env import cli_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "step_throughput.py"


def _bench_module():
    # benchmarks/ is not a package; loading the module imports no jax or torch
    spec = importlib.util.spec_from_file_location("step_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    # conftest's 8 simulated devices are not wanted: the benchmark runs on one device
    return cli_env(1)


def test_helpers_follow_the_peer_definitions():
    b = _bench_module()
    assert set(b.SHAPES) >= {"smollm2-135m", "smollm2-360m", "llama3.2-1b", "tiny"}
    # Llama-3.2-1B: 1.236e9 weight-matmul params -> 2 FLOPs each per token, x4 per step
    layers, d, heads, kv, ffn, vocab, _ = b.SHAPES["llama3.2-1b"]
    kvd = kv * d // heads
    per_token = 2 * (layers * (2 * d * d + 2 * d * kvd + 3 * d * ffn) + d * vocab)
    assert b.step_flops("llama3.2-1b", 1024, 8) == per_token * 2 * 8 * 1024 * 4
    base = {"remat": "none", "logprob_chunk": 256, "param_dtype": "float32"}
    v = b.parse_variant("remat=dots, logprob_chunk=none,param-dtype=bfloat16", base)
    assert v == {"remat": "dots", "logprob_chunk": None, "param_dtype": "bfloat16"}
    assert b.parse_variant("", base) == base
    with pytest.raises(SystemExit):
        b.parse_variant("nonsense=1", base)


def test_cudnn_failure_is_retried_with_xla_attention_once():
    b = _bench_module()
    run = {"kind": "ours", "model": "tiny", "seq": 64, "pairs": 2, "steps": 2, "warmup": 1,
           "label": "remat=dots", "variant": {"attention": "auto", "remat": "dots"},
           "status": "error", "error": "RuntimeError: cuDNN is not detected."}
    retry = b.attention_fallback(run)
    assert retry["variant"] == {"attention": "xla", "remat": "dots"}
    assert retry["label"] == "remat=dots+attention=xla(fallback)"
    assert b.attention_fallback({**run, **retry, "status": "error"}) is None  # no second retry
    assert b.attention_fallback({**run, "error": "RESOURCE_EXHAUSTED: out of memory"}) is None
    assert b.attention_fallback({**run, "status": "timeout"}) is None


@pytest.mark.slow  # three subprocesses, one of which compiles a train step: 60-120 s here
def test_tiny_benchmark_on_cpu(tmp_path):
    # The timeouts only catch a hang: with the other xdist worker compiling beside it, the
    # three jobs took over 115 s in CI, so the bounds leave several times the usual time.
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--models", "tiny", "--seq", "64", "--pairs", "2",
           "--steps", "2", "--warmup", "1", "--peer", "eager", "--peak-size", "256",
           "--timeout-s", "300", "--json-out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    runs = {r["kind"]: r for r in result["runs"]}
    assert set(runs) == {"peak", "ours", "peer"}
    for kind in ("peak", "ours", "peer"):
        assert runs[kind]["status"] == "ok", runs[kind]
    ours, peer = runs["ours"], runs["peer"]
    for r in (ours, peer):
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
        assert math.isfinite(r["loss_value"]), r
        assert r["model_tflops_per_s"] > 0 and r["mfu"] > 0, r
    assert ours["nonfinite"] == 0.0
    assert ours["compile_s"] > 0 and ours["xla_memory"]["temp_bytes"] > 0
    # our process must run on the GPU image, which has neither
    assert ours["forbidden_modules"] == []
    (row,) = result["comparisons"]
    assert (row["ours"], row["peer"]) == ("default", "eager")
    assert row["ratio"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"], rel=1e-12)
    # the printed table ends the output, with the ratio in it
    assert "ours tok/s" in proc.stdout and f"{row['ratio']:.2f}x" in proc.stdout


# --------------------------------------------------------------------------- #
# benchmarks/gpu_summary.py, --peak-from, benchmarks/memory_fit.py
# --------------------------------------------------------------------------- #
def _load(name: str):
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_ratios_and_targets():
    s = _load("gpu_summary")
    common = {"model": "llama3.2-1b", "seq": 1024, "pairs": 8}
    runs = [
        {"kind": "ours", "label": "default", "status": "ok", "tokens_per_s": 55_000.0,
         "step_s_median": 0.3, "peak_mem_gib": 30.0, "xla_memory": {"temp_bytes": 2**30}, **common},
        {"kind": "ours", "label": "remat=dots", "status": "error", "error": "OOM", **common},
        {"kind": "peer", "label": "eager", "status": "ok", "tokens_per_s": 40_000.0,
         "step_s_median": 0.4, "peak_mem_gib": 60.0, **common},
        {"kind": "peer", "label": "compiled", "status": "ok", "tokens_per_s": 50_000.0,
         "step_s_median": 0.33, "peak_mem_gib": 50.0, **common},
    ]
    ours, peers = s.rows_from(runs)
    ok, bad = ours
    assert ok["vs_eager"] == pytest.approx(55 / 40) and ok["vs_compiled"] == pytest.approx(1.1)
    assert ok["mem_vs_eager"] == pytest.approx(0.5)  # against the peer's EAGER peak
    assert ok["mem_target"] is True and ok["speed_target"] is True
    assert bad["vs_compiled"] is None and bad["mem_target"] is None
    assert len(peers) == 2
    text = s.render([{"runs": runs, "peak": None}], None)
    assert "| llama3.2-1b | default | 55,000 |" in text and "ERROR" in text


def test_peak_from_an_earlier_run(tmp_path):
    b = _bench_module()
    earlier = tmp_path / "first.json"
    earlier.write_text(json.dumps({"peak": {"kind": "peak", "label": "matmul peak", "status": "ok",
                                            "tflops": 800.0, "dtype": "bfloat16", "size": 8192}}))
    args = b.build_parser().parse_args(["--models", "tiny", "--peak-size", "-1",
                                        "--peak-from", str(earlier)])
    run = {"kind": "ours", "model": "tiny", "seq": 64, "pairs": 2, "label": "default",
           "status": "ok", "tokens_per_s": 1000.0, "peak_mem_gib": None}
    summary = b.summarise(args, [run], 0.0)
    assert summary["peak"]["tflops"] == 800.0 and "first.json" in summary["peak"]["label"]
    assert summary["runs"][0]["mfu"] == pytest.approx(summary["runs"][0]["model_tflops_per_s"] / 800)
    args.peak_from = str(tmp_path / "missing.json")
    assert b.summarise(args, [run], 0.0)["peak"] is None


@pytest.mark.slow  # one CPU compile of a tiny LoRA train step: ~30 s here
def test_memory_fit_tiny_lora_plan(tmp_path):
    out = tmp_path / "fit.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "memory_fit.py"), "--model", "tiny",
           "--seq", "32", "--pairs", "2", "--fallback-pairs", "0", "--json-out", str(out)]
    env = {**_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (plan,) = json.loads(out.read_text())["plans"]
    # LoRA r64 on q,k,v,o of 2 layers, d=64, 4 heads / 2 KV heads of 16: A [in, r] + B [r, out]
    per_layer = 64 * (64 + 64) + 2 * 64 * (64 + 32) + 64 * (64 + 64)
    assert plan["params"]["trainable"] == 2 * per_layer
    assert plan["params"]["reference"] == 0  # lora_base: no copy
    x = plan["xla_memory"]
    assert x["temp_bytes"] > 0 and x["argument_bytes"] >= plan["state_bytes"]["total"]
    assert x["total_bytes"] == (x["argument_bytes"] + x["output_bytes"] - x["alias_bytes"]
                                + x["temp_bytes"])
    assert x["alias_bytes"] == plan["state_bytes"]["total"]  # the whole state is donated
    assert plan["fits_80gb_card"] is True and plan["forbidden_modules"] == []
    assert plan["param_dtype"] == "bfloat16" and plan["remat"] == "full"
    assert "FITS" in proc.stdout
