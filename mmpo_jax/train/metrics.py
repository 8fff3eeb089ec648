"""Run metrics: `metrics.jsonl`, TensorBoard events (and the trackers of
`mmpo_jax.train.trackers`), throughput, the progress line.

`<output_dir>/metrics.jsonl` holds one strict-JSON object per line:
`{"step": 12, "loss": 0.69, "rewards/accuracies": 0.5, ..., "grad_norm": 1.3,
"learning_rate": 1e-6, "tokens_per_second": 5120.0}` for train steps, and
`{"step": 10, "eval/loss": ..., ...}` (keys prefixed) for an eval pass, in
the same file. Metric names are kept as given (they contain slashes).
Values are JSON numbers: integers stay integers, floats are floats, and a
non-finite float (NaN, +-inf) is written as `null` so every line parses with
any strict JSON reader (`json.loads`, `jq`, pandas `read_json(lines=True)`,
which reads `null` back as NaN). TensorBoard gets the value itself (NaN
included).

Resume: opening the writer with `resume_step=N` rewrites the file keeping only
records with `step <= N` (train and eval alike), so after a resume every step
appears once. The rewrite is atomic (a temp file, fsync, `os.replace`), and a
torn last line from a crash is dropped. Each written line is flushed and
fsync'd, so a kill loses at most the line in flight. TensorBoard event files
are append-only: the resumed writer is opened with `purge_step=N + 1`, which
makes TensorBoard hide the old events past step N.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import jax
import numpy as np

from mmpo_jax.errors import UserError
from mmpo_jax.files import write_text_atomic
from mmpo_jax.train.run_files import METRICS_FILE, TENSORBOARD_DIR


# -- records ------------------------------------------------------------------


def to_scalar(name: str, value: Any) -> int | float | None:
    """A JSON-ready number from a Python, numpy or jax scalar (or 1-element array).

    Integers and bools give `int`, floats give `float`, non-finite floats give
    None (JSON `null`). Raises ValueError naming `name` for anything else.
    """
    try:
        arr = np.asarray(value)
    except Exception as err:  # e.g. an object jax cannot bring to host
        raise ValueError(
            f"metric {name!r}: cannot convert {type(value).__name__} to a number ({err})"
        ) from err
    integer = arr.dtype.kind in "biu"
    # jax's issubdtype also knows the ml_dtypes floats (bfloat16, float8_*).
    if arr.size != 1 or not (integer or jax.dtypes.issubdtype(arr.dtype, np.floating)):
        raise ValueError(
            f"metric {name!r}: expected a real scalar, got {arr.dtype} of shape {arr.shape}"
        )
    if integer:
        return int(arr.reshape(()).item())
    item = float(arr.reshape(()).astype(np.float64))
    return item if math.isfinite(item) else None


def make_record(step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | None]:
    """`{"step": step, prefix + name: number, ...}` in the order of `metrics`."""
    record: dict[str, int | float | None] = {"step": int(step)}
    for name, value in metrics.items():
        key = prefix + name
        if key in record:
            raise ValueError(
                f"metric {key!r} appears twice in step {step}'s record (or clashes with 'step')"
            )
        record[key] = to_scalar(key, value)
    return record


def json_line(record: Mapping[str, Any]) -> str:
    """One strict-JSON line (NaN/inf refused: `make_record` maps them to null)."""
    return json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n"


def kept_lines(text: str, resume_step: int) -> tuple[list[str], int, list[str]]:
    """`(kept, dropped, bad)` of a metrics.jsonl text for a resume at `resume_step`.

    kept: the complete lines whose record has `step <= resume_step`, in order;
    dropped: how many valid records were past it; bad: lines that are not a
    JSON object with an integer `step`. A last line without its newline is a
    line torn by a crash (each line is written whole, newline included): it is
    dropped silently, unless it parses as a record (cut just before the newline).
    """
    *complete, last = text.split("\n")
    kept, bad, dropped = [], [], 0
    for i, line in enumerate([*complete, last]):
        if not line.strip():
            continue
        step = _record_step(line)
        if step is None:
            if i < len(complete):
                bad.append(line)
        elif step <= resume_step:
            kept.append(line + "\n")
        else:
            dropped += 1
    return kept, dropped, bad


def read_metrics(metrics_file: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, in file order; a line cut off by a crash (which
    `MetricsWriter` drops on the next resume) is skipped."""
    records = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _record_step(line: str) -> int | None:
    """The `step` of a metrics line, or None when it is not a JSON record with an int step."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def truncate_metrics_file(path: Path, resume_step: int) -> int:
    """Rewrites `path` keeping the records with `step <= resume_step`; returns how many went.

    Atomic (`files.write_text_atomic`): a crash leaves the old or the new file, never
    a mix, and the file keeps its permission bits.
    """
    if not path.exists():
        return 0
    kept, dropped, bad = kept_lines(path.read_text(encoding="utf-8", errors="replace"), resume_step)
    if bad:
        shown = "; ".join(line[:80] for line in bad[:3])
        warnings.warn(
            f"'{path}': dropped {len(bad)} line(s) that are not metric records: {shown}", stacklevel=2
        )
    write_text_atomic(path, "".join(kept))
    return dropped + len(bad)


# -- the writer ---------------------------------------------------------------


class MetricsWriter:
    """Appends metric records to `<output_dir>/metrics.jsonl` and TensorBoard.

    Args:
      output_dir: the run's output directory (created if missing).
      resume_step: the step the run starts from (0 for a fresh run): records
        past it are dropped from metrics.jsonl on open, and TensorBoard hides
        its older events past it. A run that starts at 0 (fresh, or restarted
        before its first checkpoint) makes its step-0 eval again, so it keeps no
        record at all.
      enabled: False on processes other than 0: nothing is read or written.
      tensorboard: also write TensorBoard events under `<output_dir>/tensorboard`
        (needs the `tensorboardX` package).
      trackers: also send every record to these (`mmpo_jax.train.trackers.TrackerSet`;
        the caller closes them).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        resume_step: int,
        enabled: bool = True,
        tensorboard: bool = True,
        trackers: Any = None,
    ) -> None:
        if resume_step < 0:
            raise ValueError(f"resume_step={resume_step}: must be >= 0")
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.enabled = enabled
        self._file: TextIO | None = None
        self._tb: Any = None
        self._trackers = trackers
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        last_kept = resume_step if resume_step > 0 else -1
        truncate_metrics_file(self.path, last_kept)
        if tensorboard:
            self._tb = _summary_writer(self.output_dir / TENSORBOARD_DIR, purge_step=last_kept + 1)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Appends `{"step": step, prefix + name: value, ...}`; returns the record.

        Values: Python/numpy/jax scalars (see `to_scalar`). Use `prefix="eval/"`
        for an eval pass. The line is on disk (fsync'd) when this returns.
        """
        record = make_record(step, metrics, prefix)
        if not self.enabled:
            return record
        if self._file is None:
            raise ValueError(f"MetricsWriter on '{self.path}' is closed")
        self._file.write(json_line(record))
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for name, value in metrics.items():
                # The value itself (NaN stays NaN), not the JSON null.
                number = float(np.asarray(value).reshape(()).astype(np.float64))
                self._tb.add_scalar(prefix + name, number, global_step=int(step))
            self._tb.flush()
        if self._trackers is not None:
            self._trackers.send(record)
        return record

    def close(self) -> None:
        """Closes the file and the TensorBoard writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _summary_writer(logdir: Path, purge_step: int) -> Any:
    try:
        from tensorboardX import SummaryWriter  # lazy: optional (train.report_to: tensorboard only)
    except ImportError as err:
        raise UserError(
            "TensorBoard logging needs the tensorboardX package: `pip install tensorboardX`"
        ) from err
    # purge_step: TensorBoard hides events at steps >= it from earlier writers of
    # this logdir, i.e. what a crashed run logged past the resumed step.
    # The suffix: tensorboardX names files by the second and host only and opens
    # them with "wb", so a restart within the same second would erase the previous
    # file; nanoseconds keep names unique and in time order (TensorBoard reads
    # the files of a directory in name order).
    # tensorboardX logs a warning for every NaN scalar; metrics.jsonl already records them as null
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    return SummaryWriter(logdir=str(logdir), purge_step=purge_step, filename_suffix=f".{time.time_ns()}")


# -- throughput ---------------------------------------------------------------


class Throughput:
    """Amount per second (tokens, steps) over the last `window` marks.

    Call `mark(amount)` when a step's results are on the host (after fetching
    its metrics: JAX dispatches asynchronously, so a mark before that measures
    dispatch, not compute), with the amount that step processed. The first mark
    after construction or `reset()` only starts the clock: the first step's
    time includes compilation, and after a pause (an eval, a checkpoint) the
    time since the previous mark is not training.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter) -> None:
        if window < 1:
            raise ValueError(f"window={window}: must be >= 1")
        self._clock = clock
        self._marks: collections.deque[tuple[float, float]] = collections.deque(maxlen=window + 1)

    def mark(self, amount: float, now: float | None = None) -> float | None:
        """Records one step that processed `amount`; returns the current `rate()`."""
        self._marks.append((self._clock() if now is None else now, float(amount)))
        return self.rate()

    def rate(self) -> float | None:
        """Amount per second over the marks in the window; None before two marks."""
        if len(self._marks) < 2:
            return None
        elapsed = self._marks[-1][0] - self._marks[0][0]
        if elapsed <= 0:
            return None
        # The oldest mark only bounds the interval: its amount was done before it.
        return sum(a for _, a in list(self._marks)[1:]) / elapsed

    def reset(self) -> None:
        """Forgets the marks: the next mark starts the clock again."""
        self._marks.clear()


# -- the progress line --------------------------------------------------------

# (metric name, label, format) shown on the progress line when present.
PROGRESS_METRICS = (("loss", "loss", "{:.4g}"), ("rewards/accuracies", "acc", "{:.3f}"))


def format_duration(seconds: float) -> str:
    """`H:MM:SS` (days roll into hours)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_text(
    step: int,
    total: int,
    metrics: Mapping[str, Any],
    tokens_per_second: float | None,
    eta_seconds: float | None,
) -> str:
    """`step 12/100 | loss 0.6931 | acc 0.625 | 5,120 tok/s | ETA 0:01:23` (missing parts left out)."""
    parts = [f"step {step}/{total}"]
    for name, label, fmt in PROGRESS_METRICS:
        if name in metrics:
            value = to_scalar(name, metrics[name])
            parts.append(f"{label} " + ("nan" if value is None else fmt.format(value)))
    if tokens_per_second is not None:
        parts.append(f"{tokens_per_second:,.0f} tok/s")
    if eta_seconds is not None:
        parts.append(f"ETA {format_duration(eta_seconds)}")
    return " | ".join(parts)


class Progress:
    """A one-line progress display on stderr (process 0 only).

    On a terminal the line is redrawn in place; otherwise (CI logs, files) a
    plain line is printed at the first update, every `plain_every` steps, at the
    last step, and on `close()` if the latest state was not printed yet.

    Args:
      total_steps: the run's last step.
      start_step: the step the run starts from (a resume), for the ETA.
      enabled: False on processes other than 0: prints nothing.
      stream: where to print (default sys.stderr).
      plain_every: the step interval of plain lines when not a terminal (a
        multiple of the interval `update` is called at, or lines go missing).
      clock: seconds, for the ETA (tests pass a fake one).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        plain_every: int = 10,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if plain_every < 1:
            raise ValueError(f"plain_every={plain_every}: must be >= 1")
        self.total = total_steps
        self.enabled = enabled
        self._stream = sys.stderr if stream is None else stream
        self._tty = enabled and _isatty(self._stream)
        self._plain_every = plain_every
        self._steps = Throughput(clock=clock)
        self._last_step = start_step
        self._rate: float | None = None  # steps per second
        self._text = ""  # the current line
        self._shown = ""  # what is on screen (tty) or was printed last (plain)

    def update(
        self, step: int, metrics: Mapping[str, Any] | None = None, tokens_per_second: float | None = None
    ) -> None:
        """Shows the state after `step` (metrics: the step's, e.g. `loss`, `rewards/accuracies`)."""
        if not self.enabled:
            return
        first = not self._text
        # After a pause the window restarts: keep the last rate for the ETA meanwhile.
        self._rate = self._steps.mark(step - self._last_step) or self._rate
        self._last_step = step
        eta = (self.total - step) / self._rate if self._rate else None
        self._text = progress_text(step, self.total, metrics or {}, tokens_per_second, eta)
        if self._tty:
            self._draw()
        elif first or step % self._plain_every == 0 or step >= self.total:
            self._print_plain()

    def pause(self) -> None:
        """Excludes the time until the next update from the step rate (an eval, a save)."""
        self._steps.reset()

    def message(self, text: str) -> None:
        """Prints `text` on its own line without breaking the progress line."""
        if not self.enabled:
            return
        if self._tty and self._shown:
            self._stream.write("\r" + " " * len(self._shown) + "\r" + text + "\n")
            self._shown = ""
            self._draw()
        else:
            self._stream.write(text + "\n")
            self._stream.flush()

    def close(self) -> None:
        """Ends the line (terminal) or prints the last state if not printed yet."""
        if not self.enabled or not self._text:
            return
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
        elif self._text != self._shown:
            self._print_plain()
        self._text = self._shown = ""

    def _draw(self) -> None:
        # Pad over a longer previous line instead of relying on ANSI clears.
        pad = max(0, len(self._shown) - len(self._text))
        self._stream.write("\r" + self._text + " " * pad)
        self._stream.flush()
        self._shown = self._text

    def _print_plain(self) -> None:
        self._stream.write(self._text + "\n")
        self._stream.flush()
        self._shown = self._text

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
