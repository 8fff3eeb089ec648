"""The preference metrics of a model on test pairs: the eval step's metrics (the loss's
own, rewards, accuracies, log-probs), averaged over the real pairs of every batch; what
the run's evals (`loop`) and `mmpo-jax eval` (`eval.run`) report, and their one-line summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

from mmpo_jax.data.batches import eval_batches
from mmpo_jax.data.layout import device_batch
from mmpo_jax.train.setup import Evaluator

if TYPE_CHECKING:
    from mmpo_jax.data.pipeline import PreferenceData
    from mmpo_jax.train.metrics import MetricsWriter
    from mmpo_jax.train.report import Stages
    from mmpo_jax.train.run_data import RunData
    from mmpo_jax.train.state import TrainState

# the metrics an eval's summary line shows, in this order
SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def evaluate(run: Evaluator, state: TrainState, data: PreferenceData, ref_table: np.ndarray | None,
             max_batches: int = 0) -> dict[str, float]:
    """The eval step's metrics over the test data (the first `max_batches` batches; 0 =
    all), averaged over real pairs (each batch's metrics weighted by its number of real
    pairs). `ref_table`: `[rows, 2]` reference log-probs (`model.reference=precomputed`)."""
    batches = eval_batches(data, run.cfg.data.batch_size, packing=run.packing)
    n = len(batches) if max_batches <= 0 else min(max_batches, len(batches))
    totals: dict[str, float] = {}
    weight = 0.0
    for b in range(n):
        host = batches[b]
        # every process's slice of the global batch: the real pairs of the whole batch
        rows = min((b + 1) * run.cfg.data.batch_size, len(data)) - b * run.cfg.data.batch_size
        metrics = jax.device_get(run.eval_step(state, device_batch(host, run.mesh, ref_table)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * rows
        weight += rows
    return {k: v / weight for k, v in totals.items()}


def timed_eval(run: Evaluator, state: TrainState, data: RunData, step: int, writer: MetricsWriter,
               stages: Stages) -> dict[str, float]:
    """A run's eval at `step`, written (`eval/*`) and printed with its time (the first
    compiles the eval step)."""
    assert data.test is not None, "an eval needs test data"
    n = eval_pairs(len(data.test), run.cfg.data.batch_size, run.cfg.train.eval_batches)
    compiles = " (the first batch compiles the eval step)" if step == 0 else ""
    stages.start(f"evaluating {n} test pairs at step {step}{compiles}")
    metrics = evaluate(run, state, data.test, data.test_ref, run.cfg.train.eval_batches)
    writer.write(step, metrics, prefix="eval/")
    stages.end(eval_line(step, metrics))
    return metrics


def eval_pairs(rows: int, batch_size: int, max_batches: int) -> int:
    """The test pairs an eval of `max_batches` batches (0 = all) reads of `rows`."""
    return rows if max_batches <= 0 else min(rows, max_batches * batch_size)


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """`eval @ step N: loss ..., rewards/accuracies ...`: an eval's summary for the log."""
    return f"eval @ step {step}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in SUMMARY_KEYS if k in metrics)
