"""How long a checkpoint save holds up the training loop, synchronous against
asynchronous (orbax writing in the background after copying the arrays to host
memory), on a run's real train state.

    python benchmarks/save_stall.py [CONFIG] [--saves 3] [key=value ...]

CONFIG defaults to configs/demo.yaml. For each mode it saves the state `--saves` times
into a scratch directory and prints the median of what the loop waits in `save`
(sync: the whole write; async: until the arrays are on the host) and, for async, the
time until the files are complete (`wait`), with the checkpoint's size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from mmpo_jax.config import load_config
    from mmpo_jax.train.checkpoint import Checkpointer
    from mmpo_jax.train.setup import build_trainer

    cfg = load_config(args.config, args.overrides)
    trainer = build_trainer(cfg)
    state = trainer.state
    for mode in ("sync", "async"):
        stalls, completes, size = [], [], 0
        with tempfile.TemporaryDirectory(prefix="mmpo-save-stall-") as tmp:
            with Checkpointer(Path(tmp), keep=2, async_save=mode == "async") as ckpt:
                for i in range(1, args.saves + 1):
                    start = time.perf_counter()
                    ckpt.save(i, state, "benchmark")
                    stalls.append(time.perf_counter() - start)
                    ckpt.wait()
                    completes.append(time.perf_counter() - start)
                size = sum(p.stat().st_size for p in (Path(tmp) / "checkpoints" / str(args.saves)).rglob("*")
                           if p.is_file())
        line = f"{mode:5s}: the loop waits {statistics.median(stalls):.2f} s per save"
        if mode == "async":
            line += f" (the files complete after {statistics.median(completes):.2f} s)"
        print(f"{line}; checkpoint {size / 2**20:.0f} MiB, median of {args.saves} saves")


if __name__ == "__main__":
    main()
