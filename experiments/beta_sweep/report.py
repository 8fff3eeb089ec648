"""The experiment's tables, computed from `results/summary.csv` (the README quotes this output).

    python experiments/beta_sweep/report.py [experiments/beta_sweep/results/summary.csv]

1. Spread across beta per family: for each family of runs that differ only in beta (MMPO
   with the auxiliary term, MMPO without it, MMPO without the normalisation, DPO, SimPO),
   the min, max and spread (max - min) over beta of the win rate, the capability accuracy
   (acc, acc_norm) and the eval preference accuracy.
2. Every run: its loss settings and metrics, as in the CSV.

Reads the CSV only (no jax): `tests/test_experiments.py` checks the README's tables are
exactly this output.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "results" / "summary.csv"
METRICS = ("win_rate", "judge_accuracy", "capability_acc", "capability_acc_norm", "eval_rewards_accuracies")


def family(row: dict[str, str]) -> str | None:
    """The family a run belongs to, or None for a one-off ablation (the entropy runs)."""
    if row["loss"] != "mmpo":
        return {"dpo": "DPO", "simpo": "SimPO"}.get(row["loss"])
    if float(row["entropy_weight"] or 0) > 0:
        return None
    if row["normalize"] == "none":
        return "MMPO, normalize none (aux 1)" if float(row["aux_weight"]) == 1 else None
    if float(row["aux_weight"]) == 0:
        return "MMPO without aux (aux_weight 0)"
    return "MMPO (aux_weight 1, the paper's)" if float(row["aux_weight"]) == 1 else None


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no runs")
    failed = [r["run"] for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"{path}: runs not ok: {', '.join(failed)}")
    return rows


def spread_table(rows: list[dict[str, str]]) -> str:
    families: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        name = family(r)
        if name is not None:
            families.setdefault(name, []).append(r)
    head = ["family", "betas"] + [f"{m} min / max (spread)" for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, members in families.items():
        betas = ", ".join(sorted({r["beta"] for r in members}, key=float))
        cells = [name, betas]
        for m in METRICS:
            values = [float(r[m]) for r in members]
            cells.append(f"{min(values):.4f} / {max(values):.4f} ({max(values) - min(values):.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(rows: list[dict[str, str]]) -> str:
    cols = ["run", "loss", "beta", "aux_weight", "normalize", "entropy_estimator", *METRICS, "eval_loss"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(r.get(c, "") or "-" for c in cols) + " |")
    return "\n".join(lines)


def report(path: Path = DEFAULT_CSV) -> str:
    rows = read_rows(path)
    return f"{spread_table(rows)}\n\n{runs_table(rows)}\n"


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CSV), end="")
