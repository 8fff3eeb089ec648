"""What `mmpo-jax train` tells its user: the stages with their times, and the end.

A run is silent for a while between its start and its first step (reading the model,
tokenizing, compiling); each stage says what it does before it starts and how long it
took when it ends. The end says what the run changed (the first and the last eval of
`metrics.jsonl`, so a resumed run compares with the eval of its first start) and the
commands to run next.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable

from mmpo_jax.train.metrics import read_metrics
from mmpo_jax.train.run_files import METRICS_FILE, TENSORBOARD_DIR

# The eval metrics the end compares, in this order (those the loss reports).
SUMMARY_KEYS = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "loss")


class Stages:
    """`start(text)` prints `text ...`; `end(text)` prints `text (N.N s)`, timed from the start."""

    def __init__(self, say: Callable[[str], None], clock: Callable[[], float] = time.perf_counter) -> None:
        self._say = say
        self._clock = clock
        self._started = clock()

    def start(self, text: str) -> None:
        self._say(f"{text} ...")
        self._started = self._clock()

    def end(self, text: str) -> None:
        self._say(f"{text} ({self.seconds():.1f} s)")

    def seconds(self) -> float:
        """Seconds since the last `start`."""
        return self._clock() - self._started


def count_text(n: int) -> str:
    """`134.5M`, `4.9M`, `987.6K`, `512`."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def eval_records(metrics_file: Path) -> list[dict[str, Any]]:
    """The eval records of a `metrics.jsonl`, in file order (empty when there is none)."""
    if not metrics_file.is_file():
        return []
    return [r for r in read_metrics(metrics_file) if any(k.startswith("eval/") for k in r)]


def change_lines(first: dict[str, Any], last: dict[str, Any]) -> list[str]:
    """`  rewards/accuracies 0 -> 0.8125` for each summary metric both records hold."""
    lines = []
    for key in SUMMARY_KEYS:
        a, b = first.get(f"eval/{key}"), last.get(f"eval/{key}")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            lines.append(f"  {key} {a:.4g} -> {b:.4g}")
    return lines


def next_commands(output_dir: str | os.PathLike, local_dir: str | Path, lora: bool, has_test: bool) -> list[str]:
    """The commands a user runs on a finished run, with its directory filled in (`local_dir`:
    where its log files are on this machine, `output_dir` itself unless that is a bucket)."""
    run = shlex.quote(str(output_dir))
    rows = []
    if has_test:
        rows.append((f"mmpo-jax eval {run}", "the latest checkpoint on the test data"))
    rows.append((f"mmpo-jax generate {run} --prompts FILE.jsonl", "answers to your prompts"))
    rows.append((f"mmpo-jax export {run} {shlex.quote(str(output_dir) + '-hf')}",
                 "an HF directory" + (" (LoRA merged; --adapter: PEFT's format)" if lora else "")))
    rows.append((f"tensorboard --logdir {shlex.quote(str(Path(local_dir) / TENSORBOARD_DIR))}", "the curves"))
    width = max(len(command) for command, _ in rows)
    return [f"  {command.ljust(width)}   # {what}" for command, what in rows]


def end_summary(output_dir: str | os.PathLike, local_dir: str | Path, lora: bool, has_test: bool) -> list[str]:
    """What the run changed (first vs last eval in `local_dir`'s metrics.jsonl) and what to
    run next."""
    lines: list[str] = []
    evals = eval_records(Path(local_dir) / METRICS_FILE)
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        lines.append(f"eval, step {first.get('step')} -> step {last.get('step')}:")
        lines.extend(change_lines(first, last))
    lines.append("next:")
    lines.extend(next_commands(output_dir, local_dir, lora, has_test))
    return lines
