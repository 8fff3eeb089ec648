"""Curves of runs from their `metrics.jsonl` (`mmpo-jax plot`, and the sweep's figures):
one panel per metric, runs overlaid and labelled; matplotlib's Agg canvas, so no display
and no global pyplot state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmpo_jax.errors import UserError
from mmpo_jax.train.metrics import read_metrics
from mmpo_jax.train.run_files import METRICS_FILE

DEFAULT_METRICS = ("loss", "eval/loss", "eval/rewards/accuracies")


def figure(width: float = 7.0, height: float = 5.0) -> Any:
    """A matplotlib Figure on its own Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def read_records(metrics_file: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` that carry a step (`train.metrics.read_metrics`)."""
    return [r for r in read_metrics(metrics_file) if isinstance(r.get("step"), int)]


def metric_history(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """`(steps, values)` of the records holding `key` as a finite number (a non-finite
    value is null in metrics.jsonl, and is left out)."""
    steps: list[int] = []
    values: list[float] = []
    for rec in records:
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(rec["step"]))
            values.append(float(value))
    return steps, values


def metric_names(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every metric some record holds as a number, sorted."""
    return sorted({k for rec in records for k, v in rec.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its whole path where two runs share a name."""
    names = [d.name or str(d) for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def runs_figure(run_dirs: Sequence[Path], metrics: Sequence[str] | None = None) -> tuple[Any, list[str]]:
    """`(figure, metrics plotted)`: one panel per metric, a line per run (eval metrics,
    logged every few steps, with markers). `metrics` None: those of `DEFAULT_METRICS` the
    runs have. A requested metric no run has is a UserError naming the ones they have."""
    if not run_dirs:
        raise UserError("plot: name at least one run directory")
    runs = []
    for d in run_dirs:
        path = d / METRICS_FILE
        if not path.is_file():
            raise UserError(f"plot: {d} has no {METRICS_FILE} (not a run directory of mmpo-jax train?)")
        runs.append(read_records(path))
    have = sorted({name for recs in runs for name in metric_names(recs)})
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if m in have]
        if not metrics:
            raise UserError(f"plot: the runs have none of {', '.join(DEFAULT_METRICS)}; "
                            f"choose with --metrics from: {', '.join(have) or '(no metrics yet)'}")
    missing = [m for m in metrics if m not in have]
    if missing:
        raise UserError(f"plot: no run has {', '.join(missing)}; the runs have: {', '.join(have) or '(none)'}")
    fig = figure(5.0 * len(metrics), 4.0)
    for i, metric in enumerate(metrics, 1):
        ax = fig.add_subplot(1, len(metrics), i)
        for label, recs in zip(run_labels(run_dirs), runs):
            steps, values = metric_history(recs, metric)
            if steps:
                ax.plot(steps, values, label=label, linewidth=1.2,
                        marker="o" if metric.startswith("eval/") else None, markersize=3)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, list(metrics)


def plot_runs(run_dirs: Sequence[Path], out: Path, metrics: Sequence[str] | None = None) -> list[str]:
    """`runs_figure` written to `out` (PNG); returns the metrics plotted."""
    fig, plotted = runs_figure(run_dirs, metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return plotted
