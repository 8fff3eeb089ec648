"""What a sweep writes about its runs: `summary.csv` (one row per run: its loss
hyperparameters, eval metrics, steps, time), the win-rate-vs-capability plot and the
training curves."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps

from mmpo_jax.losses.declarations import DECLARATIONS as LOSSES
from mmpo_jax.run_plots import figure, metric_history, read_records
from mmpo_jax.sweep_runs import PRECISION, Outcome, one_line, series_name
from mmpo_jax.train.run_files import METRICS_FILE

SUMMARY_FILE = "summary.csv"
FIGURE1_FILE = "win_rate_vs_capability.png"
CURVES_FILE = "training_curves.png"

# summary column -> the config key it shows (the loss hyperparameters)
LOSS_COLUMNS = {
    "loss": "loss.name",
    "beta": "loss.beta",
    "aux_weight": "loss.aux_weight",
    "normalize": "loss.normalize",
    "entropy_weight": "loss.entropy_weight",
    "entropy_estimator": "loss.entropy_estimator",
}
# summary column -> the eval metric it shows
METRIC_COLUMNS = {
    "win_rate": "win_rate/win_rate",
    "judge_accuracy": "win_rate/judge_accuracy",
    "reference_judge_accuracy": "win_rate/reference_judge_accuracy",
    "capability_acc": "capability/acc",
    "capability_acc_norm": "capability/acc_norm",
    "eval_rewards_accuracies": "eval/rewards/accuracies",
    "eval_rewards_margins": "eval/rewards/margins",
    "eval_loss": "eval/loss",
}
SUMMARY_COLUMNS = ("run", "status", *LOSS_COLUMNS, *METRIC_COLUMNS, "steps", "seconds")
LOSS_COLOURS = {"mmpo": "tab:red", "dpo": "tab:blue", "simpo": "tab:green", "sft": "tab:gray"}
LOSS_COLOURMAPS = {"mmpo": "Reds", "dpo": "Blues", "simpo": "Greens", "sft": "Greys"}



def _fmt(value: Any, decimals: int = PRECISION) -> str:
    """A summary cell: floats with a fixed number of decimals, '' for missing or NaN."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{decimals}f}"
    return str(value)


def _hyper(value: Any) -> str:
    """A hyperparameter cell: numbers as short as exact (`0.1`, `1e-07`), text as it is."""
    if isinstance(value, float):
        return f"{value:g}"
    return _fmt(value)


def extra_keys(outcomes: Sequence[Outcome]) -> list[str]:
    """The swept keys that no fixed column shows, in order of first appearance."""
    shown = set(LOSS_COLUMNS.values())
    keys: list[str] = []
    for o in outcomes:
        keys += [k for k, _ in o.spec.overrides if k not in shown and k not in keys]
    return keys


def summary_row(outcome: Outcome, extras: Sequence[str]) -> dict[str, str]:
    """One summary row (see the module docstring)."""
    spec, record = outcome.spec, outcome.record or {}
    row = {"run": spec.name, "status": outcome.status}
    loss = record.get("loss")
    for column, key in LOSS_COLUMNS.items():
        if loss is not None:
            name = loss.get("name")
            # a key the run's loss does not read is left blank (its declaration says which)
            declared = LOSSES.get(name)
            used = declared is None or key.split(".", 1)[1] in declared.config_keys
            row[column] = _hyper(loss.get(key.split(".", 1)[1])) if used else ""
        else:  # a failed run: what its overrides said
            row[column] = spec.value(key) or ""
    metrics = record.get("metrics", {})
    for column, key in METRIC_COLUMNS.items():
        row[column] = _fmt(metrics.get(key))
    row["steps"] = _fmt(record.get("steps"))
    row["seconds"] = _fmt(record.get("seconds"), 1)
    for key in extras:
        row[key] = spec.value(key) or ""
    return row


def summary_table(outcomes: Sequence[Outcome]) -> tuple[list[str], list[dict[str, str]]]:
    """`(columns, rows)` of summary.csv."""
    extras = extra_keys(outcomes)
    fixed = list(SUMMARY_COLUMNS)
    at = fixed.index("entropy_estimator") + 1  # the swept keys beside the loss's
    columns = fixed[:at] + extras + fixed[at:]
    return columns, [summary_row(o, extras) for o in outcomes]


def write_summary(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(out: Path, outcomes: Sequence[Outcome], log: Callable[[str], None]) -> None:
    """summary.csv and both plots; a plot that fails is reported, not fatal."""
    columns, rows = summary_table(outcomes)
    write_summary(out / SUMMARY_FILE, columns, rows)
    plotted = []
    for name, plot in ((FIGURE1_FILE, plot_win_rate_vs_capability), (CURVES_FILE, plot_training_curves)):
        try:
            plot(outcomes, rows, out, out / name)
            plotted.append(str(out / name))
        except Exception as err:  # noqa: BLE001 - the summary matters more than a figure
            log(f"warning: could not draw {out / name}: {one_line(err)}")
    ok = sum(o.status == "ok" for o in outcomes)
    log(f"summary: {out / SUMMARY_FILE}; plots: {', '.join(plotted) or 'none'}; "
        f"{ok} ok, {len(outcomes) - ok} failed")


# Plots: matplotlib's Agg canvas (no display, no global pyplot state)
def _colour(loss: str) -> str:
    return LOSS_COLOURS.get(loss, "tab:purple")


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def plot_win_rate_vs_capability(outcomes: Sequence[Outcome], rows: Sequence[Mapping[str, str]],
                                out: Path, path: Path) -> None:
    """Win rate (y) against capability accuracy (x), a point per run coloured by loss and
    labelled with its beta, the runs of a series (same overrides but beta) joined in
    beta order. Without both numbers for any run: eval rewards/accuracies against eval
    loss instead, as the title says."""
    have = [(o, r) for o, r in zip(outcomes, rows)
            if o.status == "ok" and _float(r["win_rate"]) is not None and _float(r["capability_acc"]) is not None]
    if have:
        xcol, ycol = "capability_acc", "win_rate"
        title = "Win rate against the reference vs capability accuracy (MMPO paper, Figure 1)"
        xlabel, ylabel = "capability probe accuracy (acc)", "win rate vs reference (judge)"
    else:
        have = [(o, r) for o, r in zip(outcomes, rows)
                if o.status == "ok" and _float(r["eval_loss"]) is not None
                and _float(r["eval_rewards_accuracies"]) is not None]
        xcol, ycol = "eval_loss", "eval_rewards_accuracies"
        missing = [(what, flag) for what, flag, col in (("win rate", "--win-rate", "win_rate"),
                                                         ("capability accuracy", "--capability", "capability_acc"))
                   if not any(_float(r[col]) is not None for r in rows)] or [("win rate with capability", "both")]
        title = (f"No {' and no '.join(w for w, _ in missing)} computed (sweep without "
                 f"{' '.join(f for _, f in missing)}):\neval rewards/accuracies vs eval loss instead")
        xlabel, ylabel = "eval loss", "eval rewards/accuracies"
    fig = figure()
    ax = fig.add_subplot(1, 1, 1)
    series: dict[str, list[tuple[float, float | None, float | None, str, str]]] = {}
    markers = "osD^v<>P*X"
    for o, r in have:
        beta = _float(r["beta"])
        series.setdefault(series_name(o.spec), []).append(
            (beta if beta is not None else math.nan, _float(r[xcol]), _float(r[ycol]), r["beta"], r["loss"]))
    per_loss: dict[str, int] = {}
    for name, points in series.items():
        points.sort(key=lambda p: p[0])
        loss = points[0][4]
        marker = markers[per_loss.get(loss, 0) % len(markers)]
        per_loss[loss] = per_loss.get(loss, 0) + 1
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        ax.plot(xs, ys, linestyle="-", linewidth=0.8, alpha=0.5, color=_colour(loss))
        ax.scatter(xs, ys, color=_colour(loss), marker=marker, label=name, zorder=3)
        for _, x, y, beta_text, _ in points:
            if beta_text:
                ax.annotate(f"β={beta_text}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if ycol == "win_rate":
        ax.axhline(0.5, color="black", linestyle=":", linewidth=0.8, label="tie with the reference")
    if not have:
        ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=9)
    ax.margins(0.15)  # room for the beta labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if have:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def train_losses(metrics_file: Path) -> tuple[list[int], list[float]]:
    """`(steps, losses)` of the train records of a `metrics.jsonl` (eval records skipped)."""
    return metric_history(read_records(metrics_file), "loss") if metrics_file.is_file() else ([], [])


def plot_training_curves(outcomes: Sequence[Outcome], rows: Sequence[Mapping[str, str]],
                         out: Path, path: Path) -> None:
    """Train loss per step of every run (its metrics.jsonl), one panel per loss (their
    scales differ), one line per run."""
    curves: dict[str, list[tuple[str, list[int], list[float]]]] = {}
    for o, r in zip(outcomes, rows):
        steps, losses = train_losses(out / o.spec.name / METRICS_FILE)
        if steps:
            curves.setdefault(r["loss"] or "?", []).append((o.spec.name, steps, losses))
    panels = max(1, len(curves))
    fig = figure(5.0 * panels, 4.0)
    if not curves:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=ax.transAxes)
    for i, (loss, lines) in enumerate(curves.items(), 1):
        ax = fig.add_subplot(1, panels, i)
        cmap = colormaps[LOSS_COLOURMAPS.get(loss, "Purples")]
        for j, (name, steps, losses) in enumerate(lines):
            # the loss's hue, darker for later runs (higher beta when beta is the last axis)
            shade = cmap(0.4 + 0.55 * j / (len(lines) - 1)) if len(lines) > 1 else cmap(0.75)
            ax.plot(steps, losses, label=name, color=shade, linewidth=1.2)
        ax.set_title(f"{loss}: train loss", color=_colour(loss))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
