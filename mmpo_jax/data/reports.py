"""What happened to a source's rows and a split's lengths: the rows dropped per reason
(with their first row numbers), length statistics, and the bad-row limit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmpo_jax.data.formats import INVALID_REASONS
from mmpo_jax.data.json_rows import BadLine
from mmpo_jax.errors import UserError

if TYPE_CHECKING:

    pass


FIRST_ROWS = 5  # row numbers kept per drop reason


# Reports
@dataclass
class Drops:
    count: int = 0
    rows: list[int] = field(default_factory=list)  # the first FIRST_ROWS row numbers

    def add(self, number: int) -> None:
        self.count += 1
        if len(self.rows) < FIRST_ROWS:
            self.rows.append(int(number))


@dataclass
class SourceReport:
    name: str
    key: str
    layout: str
    label: str  # "line" or "row": what the row numbers count
    rows_in_source: int
    fraction: float
    rows_read: int
    kept: int = 0
    dropped: dict[str, Drops] = field(default_factory=dict)
    template_error: str = ""  # the chat template's first error message
    line_errors: dict[str, str] = field(default_factory=dict)  # JSON reason -> first bad line

    def drop(self, reason: str, number: int) -> None:
        self.dropped.setdefault(reason, Drops()).add(number)

    def drop_line(self, line: BadLine) -> None:
        self.drop(line.reason, line.number)
        self.line_errors.setdefault(line.reason, line.detail)

    def summary(self) -> str:
        """`3150 rows kept, 0 dropped` or `14 of 21 rows kept, 7 dropped (wrong_type 2, ...)`."""
        dropped = sum(d.count for d in self.dropped.values())
        if not dropped:
            return f"{self.kept} rows kept, 0 dropped"
        reasons = ", ".join(
            f"{r} {d.count}" for r, d in sorted(self.dropped.items(), key=lambda x: -x[1].count)
        )
        return f"{self.kept} of {self.rows_read} rows kept, {dropped} dropped ({reasons})"

    @property
    def invalid(self) -> int:
        return sum(d.count for r, d in self.dropped.items() if r in INVALID_REASONS)


@dataclass
class SplitReport:
    split: str
    sources: list[SourceReport]
    max_length: int
    max_prompt_length: int | None
    prompt_truncated: int  # kept rows whose prompt was cut
    completion_truncated: int  # kept rows with a chosen or rejected completion cut
    truncated: int  # kept rows with anything cut
    lengths_before: dict[str, dict[str, float]]  # token-length stats before truncation
    lengths: dict[str, dict[str, float]]  # after truncation: what the model sees

    @property
    def rows_read(self) -> int:
        return sum(s.rows_read for s in self.sources)

    @property
    def kept(self) -> int:
        return sum(s.kept for s in self.sources)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_read"], out["kept"] = self.rows_read, self.kept
        return out


def length_stats(values: np.ndarray) -> dict[str, float]:
    """min / p50 / p90 / p99 / max / mean of token lengths (zeros when empty)."""
    if len(values) == 0:
        return dict.fromkeys(("min", "p50", "p90", "p99", "max", "mean"), 0.0)
    q = np.percentile(values, [50, 90, 99], method="higher")  # lengths that occur
    return {
        "min": float(values.min()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": float(values.max()),
        "mean": round(float(values.mean()), 2),
    }


def lengths_table(lengths: np.ndarray) -> dict[str, dict[str, float]]:
    p, c, r = lengths[:, 0], lengths[:, 1], lengths[:, 2]
    return {
        "prompt": length_stats(p),
        "chosen": length_stats(c),
        "rejected": length_stats(r),
        "sequence": length_stats(p + np.maximum(c, r)),
    }


def check_invalid(report: SourceReport, max_fraction: float) -> None:
    """Stops with the worst reasons and their rows when too many rows are bad."""
    if report.rows_read == 0 or report.invalid / report.rows_read <= max_fraction:
        return
    lines = [
        f"{report.key}: '{report.name}': {report.invalid} of {report.rows_read} rows are invalid "
        f"({100 * report.invalid / report.rows_read:.1f}%), more than "
        f"data.max_invalid_fraction={max_fraction}:"
    ]
    bad = sorted(
        ((r, d) for r, d in report.dropped.items() if r in INVALID_REASONS),
        key=lambda x: -x[1].count,
    )
    for reason, drops in bad:
        lines.append(
            f"  {reason}: {drops.count} ({format_rows(report.label, drops)}): {INVALID_REASONS[reason]}"
        )
        if reason == "chat_template_error" and report.template_error:
            lines.append(f"    first error: {report.template_error}")
        if reason in report.line_errors:
            lines.append(f"    first error: {report.line_errors[reason]}")
    lines.append("Fix or remove these rows, or raise data.max_invalid_fraction.")
    raise UserError("\n".join(lines))


def format_rows(label: str, drops: Drops) -> str:
    more = ", ..." if drops.count > len(drops.rows) else ""
    plural = "s" if drops.count > 1 else ""
    return f"{label}{plural} {', '.join(map(str, drops.rows))}{more}"
