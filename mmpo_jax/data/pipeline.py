"""Preference data end to end: sources -> checked records -> cached token ids -> grain batches.

Sources. `data.train_files` / `data.test_files` name a path, a list of paths or
a hub id (loaded with `datasets.load_dataset(id, split=data.split)`, or
`data.test_split` for test); `data.mixture` maps sources to the fraction of
each to keep (the first `floor(fraction * rows)` rows, as alignment-handbook's
`dataset_mixer`) and replaces `train_files`. Local files are `.json` / `.jsonl`
(read line by line by `json_rows`, so a malformed line is a bad row with its
number and rows of mixed types survive to be counted) and `.parquet` (read by
`datasets`).
`builtin:demo` and `builtin:demo-standard` name the shipped demo data
(conversational / standard), split by `data.split` / `data.test_split`.

Rows. Each source is checked and put in explicit-prompt form
(`formats.normalize_row`); bad rows are dropped and counted per reason with
their first row numbers (1-based lines of JSON lines files, 1-based row indices
otherwise). More than `data.max_invalid_fraction` bad rows in a source stops
the run. Token ids are computed once per source with `datasets.Dataset.map`,
cached under `<data.cache_dir or datasets' cache>/mmpo_jax_tokenized/` with a
fingerprint of the records, the tokenizer's content and `formats.py`'s code; a
restart loads the cache file without tokenizing. A source that fails (a missing
package stops tokenization; too many bad rows) leaves no cache file, so the
next run tokenizes again. Truncation is applied after the cache (lengths only),
so changing the limits never re-tokenizes.

Batches. A global batch is a pure function of `(data.seed, step)`:
`epoch, i = divmod(step, steps_per_epoch)`, the epoch's order is grain's
`MapDataset.range(rows).shuffle(seed)` read at `epoch * rows + j` (grain
reseeds each epoch with `seed + epoch`), and global batch `step` is positions
`i * batch_size ... (i + 1) * batch_size - 1` of that order. The last
`rows % batch_size` rows of each epoch's order are dropped (different rows each
epoch; reported by `batch_plan`). Process `p` of `P` takes the contiguous slice
`[p * batch_size / P, (p + 1) * batch_size / P)` of the pairs, so a resumed run
(given its step) sees exactly the batches it would have seen, on any number of
processes that divides `batch_size`.

Every sequence of a global batch is right-padded to the same bucket length:
the smallest of `bucket_lengths(max_length, 16)` (powers of two from 16, then
`max_length`: `ceil(log2(max_length / 16)) + 1` buckets, 7 for 1024) that holds
the batch's longest prompt + completion. All processes pick the same length,
since they all hold every row's length.

`PreferenceBatch` (numpy arrays; `pairs` = `batch_size / P` on each process):

    input_ids      int32 [pairs, 2, seq]  [:, 0] prompt + chosen, [:, 1] prompt + rejected,
                                          then `pad` ids
    attention_mask int32 [pairs, 2, seq]  1 on real tokens, 0 on padding
    loss_mask      int32 [pairs, 2, seq]  1 where input_ids[p, k, t] is a completion token
                                          and t >= 1: the token predicted from ids[..., :t]
                                          (so logits at t - 1 score it)
    pair_mask      int32 [pairs]          1 for a real pair, 0 for a padding pair (eval only)
    example_index  int32 [pairs]          the pair's row in `PreferenceData` (-1: padding)
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import flax.struct
import numpy as np

from mmpo_jax.buckets import bucket_for, bucket_lengths
from mmpo_jax.data import formats
from mmpo_jax.data.formats import INVALID_REASONS, TOO_LONG, Layout, SpecialIds
from mmpo_jax.data.json_rows import BadLine, BadLines, RawRows, read_json_rows
from mmpo_jax.errors import UserError

if TYPE_CHECKING:
    import grain

    from mmpo_jax.config import DataConfig

Split = Literal["train", "test"]

JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIXES = (".parquet",)
DEMO_SOURCES = {"builtin:demo": "conversational", "builtin:demo-standard": "standard"}
FIRST_ROWS = 5  # row numbers kept per drop reason
SMALLEST_BUCKET = 16
CACHE_VERSION = "1"
_UNBOUNDED = sys.maxsize  # the train batches are indexed by step, without end


# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SourceSpec:
    """One source as the config names it."""

    spec: str
    key: str  # the config key it came from, for messages
    fraction: float = 1.0
    split: str = "train"  # for hub ids and the builtin demo


def source_specs(cfg: DataConfig, which: Split) -> list[SourceSpec]:
    """The sources of the train or test split (empty: no test data configured)."""
    if which == "train" and cfg.mixture:
        return [SourceSpec(s, "data.mixture", float(f), cfg.split) for s, f in cfg.mixture.items()]
    files = cfg.train_files if which == "train" else cfg.test_files
    key = f"data.{which}_files"
    if files is None:
        if which == "train":
            raise UserError(
                "data.train_files is not set: name a .jsonl/.json/.parquet file, a list of them, "
                "a hub id or builtin:demo (or set data.mixture)"
            )
        return []
    split = cfg.split if which == "train" else cfg.test_split
    return [SourceSpec(f, key, 1.0, split) for f in ([files] if isinstance(files, str) else files)]


def local_data_file(src: SourceSpec) -> Path | None:
    """The file a `.json`/`.jsonl`/`.parquet` source names (None: another kind of source);
    a UserError naming `src.key` when it is missing or not a file. Cheap: a run checks
    every source with it before loading anything."""
    path = Path(src.spec).expanduser()
    if path.suffix.lower() not in JSON_SUFFIXES + PARQUET_SUFFIXES:
        return None
    if not path.exists():
        raise UserError(f"{src.key}: no such file '{src.spec}' (looked in {path.absolute().parent})")
    if not path.is_file():
        raise UserError(f"{src.key}: '{src.spec}' is not a file")
    return path


def read_source(
    src: SourceSpec, cache_dir: str | None = None, bad_lines: BadLines = "raise"
) -> RawRows:
    """Reads every row of one source; a UserError naming `src.key` if it cannot.
    `bad_lines="collect"`: bad JSON lines become `RawRows.bad` instead of an error."""
    if src.spec in DEMO_SOURCES:
        return _read_demo(src, bad_lines)
    path = local_data_file(src)
    if path is not None:
        if path.suffix.lower() in JSON_SUFFIXES:
            return read_json_rows(path, src.key, bad_lines)
        return _read_parquet(path, src.key, cache_dir)
    path = Path(src.spec).expanduser()
    if path.exists():
        raise UserError(
            f"{src.key}: '{src.spec}' is not a .json, .jsonl or .parquet file "
            "(a directory or another format); name the data files"
        )
    return _read_hub(src, cache_dir)


def _read_demo(src: SourceSpec, bad_lines: BadLines) -> RawRows:
    from mmpo_jax.data.builtin import demo_data_path

    if src.split not in ("train", "test"):
        raise UserError(
            f"{src.key}={src.spec}: the demo data has splits train and test, not '{src.split}'"
        )
    raw = read_json_rows(demo_data_path(src.split, DEMO_SOURCES[src.spec]), src.key, bad_lines)
    raw.name = f"{src.spec} ({src.split})"
    return raw


def _read_parquet(path: Path, key: str, cache_dir: str | None) -> RawRows:
    import datasets

    try:
        ds = datasets.load_dataset(
            "parquet", data_files=str(path), split="train", cache_dir=cache_dir
        )
    except Exception as err:  # a corrupt or non-parquet file
        raise UserError(f"{key}: cannot read '{path}' as parquet: {_first_line(err)}") from None
    rows = ds.to_list()
    return RawRows(str(path), rows, list(range(1, len(rows) + 1)), "row", list(ds.column_names))


def _read_hub(src: SourceSpec, cache_dir: str | None) -> RawRows:
    import datasets

    try:
        ds = datasets.load_dataset(src.spec, split=src.split, cache_dir=cache_dir)
    except (
        Exception
    ) as err:  # offline, unknown id, unknown split, no access: all fixable by the user
        raise UserError(
            f"{src.key}: no such local file '{src.spec}', and loading it as a hub dataset "
            f"(split '{src.split}') failed: {type(err).__name__}: {_first_line(err)}. "
            "Check the path or the hub id and split; offline (HF_DATASETS_OFFLINE=1) only "
            "datasets already in the cache load."
        ) from None
    rows = ds.to_list()
    return RawRows(
        f"{src.spec} ({src.split})",
        rows,
        list(range(1, len(rows) + 1)),
        "row",
        list(ds.column_names),
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------- #
# Reports
# --------------------------------------------------------------------------- #
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


def _lengths_table(lengths: np.ndarray) -> dict[str, dict[str, float]]:
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


# --------------------------------------------------------------------------- #
# One source: check, tokenize (cached), truncate
# --------------------------------------------------------------------------- #
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class SourceData:
    """A source's kept rows. Ids stay untruncated, as flat arrays read once from the
    tokenized cache (a row is a slice: fast to gather for every batch)."""

    values: dict[str, np.ndarray]  # column -> int32 [tokens of every tokenized row]
    starts: dict[str, np.ndarray]  # column -> int64 [tokenized rows]: where each row begins
    rows: np.ndarray  # [kept] int64: the kept rows' positions among the tokenized rows
    numbers: np.ndarray  # [kept] int64: their row numbers in the source (line or row index)
    lengths_before: np.ndarray  # [kept, 3] int64: prompt, chosen, rejected tokens
    lengths: np.ndarray  # [kept, 3] int64: after truncation
    report: SourceReport

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kept row `j`'s untruncated (prompt, chosen, rejected) ids."""
        r = self.rows[j]
        return tuple(  # type: ignore[return-value]
            self.values[c][self.starts[c][r] : self.starts[c][r] + self.lengths_before[j, k]]
            for k, c in enumerate(ID_COLUMNS)
        )


def tokenized_cache_dir(cache_dir: str | None) -> Path:
    import datasets

    root = Path(cache_dir).expanduser() if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    return root / "mmpo_jax_tokenized"


def records_fingerprint(records: dict[str, list], kind: str, tokenizer_fp: str) -> str:
    """Names the tokenized cache file: the records, the tokenizer and the code that tokenizes."""
    h = hashlib.sha256(f"{CACHE_VERSION}|{kind}|{tokenizer_fp}|".encode())
    h.update(Path(formats.__file__).read_bytes())
    for name in ("row", "prompt", "chosen", "rejected"):
        h.update(json.dumps(records[name], ensure_ascii=False).encode())
    return h.hexdigest()[:40]


def prepare_source(
    src: SourceSpec,
    cfg: DataConfig,
    tokenizer: Any,
    tokenizer_fp: str,
    special: SpecialIds,
    log: Callable[[str], None] | None = None,
) -> SourceData:
    """Reads, checks and tokenizes one source; `log` hears a line before and after."""
    start = time.perf_counter()
    raw = read_source(src, cfg.cache_dir, bad_lines="collect")
    n_total = len(raw.rows) + len(raw.bad)
    if n_total == 0:
        raise UserError(f"{src.key}: '{raw.name}' has no rows")
    n_read = math.floor(src.fraction * n_total) if src.fraction < 1 else n_total
    if n_read == 0:
        raise UserError(
            f"{src.key}: fraction {src.fraction} of the {n_total} rows of '{raw.name}' keeps none"
        )
    rows, numbers, bad = _first_rows(raw, n_read)
    where = f"{src.key}: '{raw.name}'"
    report = SourceReport(raw.name, src.key, "", raw.label, n_total, src.fraction, n_read)
    for line in bad:
        report.drop_line(line)
    if bad:
        # Before the layout: a file of mostly garbage has no columns to detect one from.
        check_invalid(report, cfg.max_invalid_fraction)
        if not rows:
            first = next(iter(report.line_errors.values()))
            raise UserError(f"{where}: no line of it is a JSON object ({first}): fix the file")
    layout: Layout = formats.detect_layout(rows, raw.columns, cfg.format, where)
    report.layout = layout.describe()

    records: dict[str, list] = {"row": [], "prompt": [], "chosen": [], "rejected": []}
    for row, number in zip(rows, numbers):
        record, reason = formats.normalize_row(row, layout)
        if record is None:
            report.drop(reason, number)
            continue
        records["row"].append(number)
        for name in ("prompt", "chosen", "rejected"):
            records[name].append(record[name])
    if layout.kind == "conversational" and not tokenizer.chat_template:
        raise UserError(
            f"{where} is conversational, but data.tokenizer={cfg.tokenizer!r} has no chat template: "
            "use a tokenizer with one, or standard (string) data"
        )
    cache_file = None
    if records["row"]:
        cache = tokenized_cache_dir(cfg.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        cache_file = cache / f"{records_fingerprint(records, layout.kind, tokenizer_fp)}.arrow"
        if cache_file.exists():
            _drop_unreadable_cache(cache_file, raw.name, log or _warn)
        if log is not None:
            n = len(records["row"])
            log(
                f"reusing the tokenized cache of {raw.name} ({n} rows)"
                if cache_file.exists()
                else f"tokenizing {n} rows of {raw.name}"
            )
    try:
        data = _tokenized_source(
            records, layout.kind, cache_file, tokenizer, special, cfg, report, log is not None
        )
    except Exception:
        # A failed source must not be reused: the failure may be this machine's (a package
        # installed since, a chat template error that another jinja2 fixes).
        if cache_file is not None:
            _remove_cache_file(cache_file)
        raise
    if log is not None:
        log(f"{raw.name}: {report.summary()} ({time.perf_counter() - start:.1f} s)")
    return data


def _first_rows(raw: RawRows, n: int) -> tuple[list[dict[str, Any]], list[int], list[BadLine]]:
    """The rows and bad lines among the first `n` of the source, in file order."""
    if n >= len(raw.rows) + len(raw.bad):
        return raw.rows, raw.numbers, raw.bad
    if not raw.bad:
        return raw.rows[:n], raw.numbers[:n], []
    last = sorted(raw.numbers + [b.number for b in raw.bad])[n - 1]
    k = bisect.bisect_right(raw.numbers, last)
    return raw.rows[:k], raw.numbers[:k], [b for b in raw.bad if b.number <= last]


def _drop_unreadable_cache(cache_file: Path, name: str, say: Callable[[str], None]) -> None:
    """Deletes a tokenized-cache file that does not read back whole (cut by a full disk,
    overwritten), with a notice: left there, it would fail every run until deleted by hand."""
    import datasets

    try:
        datasets.Dataset.from_file(str(cache_file))
        return
    except Exception as err:  # pyarrow's OSError / ArrowInvalid, and whatever a bad file gives
        reason = f"{type(err).__name__}: {_first_line(err)}"
    _remove_cache_file(cache_file)
    say(f"the tokenized cache of {name} ({cache_file}) cannot be read ({reason}); deleted it, tokenizing again")


def _warn(text: str) -> None:
    warnings.warn(text, stacklevel=3)


def _remove_cache_file(path: Path) -> None:
    # datasets.map writes a temporary file beside it and renames it when done (removing it
    # on an exception), with no sidecar files: the .arrow file is the whole cache entry.
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _progress_bars_off(off: bool) -> Iterator[None]:
    """datasets' progress bars off inside (when `off`), as they were outside."""
    import datasets

    forced = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None  # the env var wins
    if not off or forced or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _tokenized_source(
    records: dict[str, list],
    kind: formats.Kind,
    cache_file: Path | None,
    tokenizer: Any,
    special: SpecialIds,
    cfg: DataConfig,
    report: SourceReport,
    quiet: bool,
) -> SourceData:
    """Tokenizes the records (or reads `cache_file`), truncates and checks the bad rows;
    `quiet`: without datasets' progress bar."""
    import datasets
    import pyarrow.compute as pc

    ids = datasets.List(datasets.Value("int32"))
    features = datasets.Features(
        {
            "row": datasets.Value("int64"),
            "prompt_ids": ids,
            "chosen_ids": ids,
            "rejected_ids": ids,
            "error": datasets.Value("string"),
        }
    )
    if cache_file is not None:
        with _progress_bars_off(quiet):
            table = datasets.Dataset.from_dict(records).map(
                formats.tokenize_records,
                fn_kwargs={"tokenizer": tokenizer, "kind": kind, "special": special},
                batched=True,
                batch_size=256,
                remove_columns=["prompt", "chosen", "rejected"],
                features=features,
                cache_file_name=str(cache_file),
                new_fingerprint=cache_file.stem,
                load_from_cache_file=True,
                desc=f"Tokenizing {report.name}",
            )
    else:
        table = datasets.Dataset.from_dict({k: [] for k in features}, features=features)

    values, starts, lens = {}, {}, []
    for name in ID_COLUMNS:
        column = table.data.column(name)
        n = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        values[name] = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int32)
        starts[name] = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
        lens.append(n)
    before = np.stack(lens, axis=1).reshape(-1, 3)
    after = np.stack(
        formats.truncated_lengths(
            before[:, 0], before[:, 1], before[:, 2], cfg.max_length, cfg.max_prompt_length
        ),
        axis=1,
    )
    errors = table.data.column("error").to_pylist()
    row_numbers = table.data.column("row").to_pylist()
    keep = np.zeros(len(table), dtype=bool)
    for i, error in enumerate(errors):
        if error:
            report.drop("chat_template_error", row_numbers[i])
            report.template_error = report.template_error or error
        elif after[i, 1] == 0 or after[i, 2] == 0:
            report.drop(TOO_LONG, row_numbers[i])
        else:
            keep[i] = True
    report.kept = int(keep.sum())
    check_invalid(report, cfg.max_invalid_fraction)
    kept = np.nonzero(keep)[0]
    numbers = np.asarray(row_numbers, dtype=np.int64)[kept]
    return SourceData(values, starts, kept, numbers, before[kept], after[kept], report)


# --------------------------------------------------------------------------- #
# A split: every source, ready for batches
# --------------------------------------------------------------------------- #
@dataclass
class PreferenceData:
    """The kept rows of a split, in source order, with untruncated ids and their lengths."""

    sources: list[SourceData]
    special: SpecialIds
    max_length: int
    max_prompt_length: int | None
    report: SplitReport
    tokenizer: Any = None

    def __post_init__(self) -> None:
        sizes = [len(s) for s in self.sources]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.lengths = (
            np.concatenate([s.lengths for s in self.sources])
            if self.sources
            else np.zeros((0, 3), np.int64)
        )

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def seq_lengths(self) -> np.ndarray:
        """`[rows]` prompt + longer completion, after truncation."""
        return self.lengths[:, 0] + np.maximum(self.lengths[:, 1], self.lengths[:, 2])

    def _locate(self, i: int) -> tuple[SourceData, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self.sources[s], i - int(self._offsets[s])

    def pair(self, i: int) -> tuple[list[int], list[int], list[int]]:
        """Row `i`'s truncated `(prompt, chosen, rejected)` ids."""
        src, j = self._locate(i)
        prompt, chosen, rejected = src.ids(j)
        p, c, r = (int(x) for x in src.lengths[j])
        return (
            formats.keep_prompt_end(prompt.tolist(), p, self.special.bos),
            chosen[:c].tolist(),
            rejected[:r].tolist(),
        )

    def origin(self, i: int) -> str:
        """Where row `i` came from, as a user finds it: `file.jsonl line 12`."""
        src, j = self._locate(i)
        return f"{src.report.name} {src.report.label} {src.numbers[j]}"


def load_preference_data(
    cfg: DataConfig,
    which: Split,
    tokenizer: Any | None = None,
    log: Callable[[str], None] | None = None,
) -> PreferenceData | None:
    """Loads, checks and tokenizes the train or test split (None: no test data set).

    `log` (a run's log) hears, per source, `tokenizing N rows of NAME` or `reusing the
    tokenized cache of NAME (N rows)`, then what was kept and the seconds taken;
    datasets' own progress bar is off while it does. None: nothing is said."""
    from mmpo_jax.data.tokenizers import load_tokenizer, special_ids, tokenizer_fingerprint

    specs = source_specs(cfg, which)
    if not specs:
        return None
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    special = special_ids(tokenizer)
    tok_fp = tokenizer_fingerprint(tokenizer)
    sources = [prepare_source(s, cfg, tokenizer, tok_fp, special, log) for s in specs]
    if sum(s.report.kept for s in sources) == 0:
        raise UserError(
            f"{specs[0].key}: no row of the {which} data is left to train on "
            f"({sum(s.report.rows_read for s in sources)} read, all dropped); "
            "see the reasons with `mmpo-jax inspect-data`"
        )
    before = np.concatenate([s.lengths_before for s in sources])
    after = np.concatenate([s.lengths for s in sources])
    prompt_cut = after[:, 0] < before[:, 0]
    completion_cut = (after[:, 1] < before[:, 1]) | (after[:, 2] < before[:, 2])
    report = SplitReport(
        split=which,
        sources=[s.report for s in sources],
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        prompt_truncated=int(prompt_cut.sum()),
        completion_truncated=int(completion_cut.sum()),
        truncated=int((prompt_cut | completion_cut).sum()),
        lengths_before=_lengths_table(before),
        lengths=_lengths_table(after),
    )
    return PreferenceData(
        sources, special, cfg.max_length, cfg.max_prompt_length, report, tokenizer
    )


# --------------------------------------------------------------------------- #
# Batches
# --------------------------------------------------------------------------- #
@flax.struct.dataclass
class PreferenceBatch:
    """Pair-major batch; shapes and dtypes in the module docstring."""

    input_ids: np.ndarray  # int32 [pairs, 2, seq]
    attention_mask: np.ndarray  # int32 [pairs, 2, seq]
    loss_mask: np.ndarray  # int32 [pairs, 2, seq]
    pair_mask: np.ndarray  # int32 [pairs]
    example_index: np.ndarray  # int32 [pairs]


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    example_index: Sequence[int],
    seq_len: int,
    pad_id: int,
    num_pairs: int | None = None,
) -> PreferenceBatch:
    """Right-pads `(prompt, chosen, rejected)` pairs into a batch of `num_pairs` (default
    `len(pairs)`) pairs of `seq_len` tokens; the extra pairs are padding (pair_mask 0)."""
    n = len(pairs) if num_pairs is None else num_pairs
    input_ids = np.full((n, 2, seq_len), pad_id, dtype=np.int32)
    attention = np.zeros((n, 2, seq_len), dtype=np.int32)
    completion = np.zeros((n, 2, seq_len), dtype=np.int32)
    for p, (prompt, chosen, rejected) in enumerate(pairs):
        seqs, masks = formats.pair_sequences(prompt, chosen, rejected)
        for k in (0, 1):
            t = len(seqs[k])
            input_ids[p, k, :t] = seqs[k]
            attention[p, k, :t] = 1
            completion[p, k, :t] = masks[k]
    completion[:, :, 0] = 0  # nothing predicts the first token
    pair_mask = np.zeros(n, dtype=np.int32)
    pair_mask[: len(pairs)] = 1
    index = np.full(n, -1, dtype=np.int32)
    index[: len(pairs)] = np.asarray(example_index, dtype=np.int32)
    return PreferenceBatch(input_ids, attention, completion, pair_mask, index)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise UserError(
            f"data.batch_size={batch_size} must be a multiple of the {process_count} processes"
        )
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def epoch_order(num_rows: int, seed: int) -> grain.MapDataset:
    """Element `epoch * num_rows + j` is the row at position `j` of that epoch's order."""
    import grain

    return grain.MapDataset.range(num_rows).shuffle(seed=seed)


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return num_rows // batch_size


def global_batch_rows(
    order: grain.MapDataset, num_rows: int, batch_size: int, step: int
) -> np.ndarray:
    """`[batch_size]` rows of global batch `step` (a pure function of the seed and the step)."""
    per_epoch = steps_per_epoch(num_rows, batch_size)
    epoch, i = divmod(step, per_epoch)
    start = epoch * num_rows + i * batch_size
    return np.fromiter(
        (order[start + k] for k in range(batch_size)), dtype=np.int64, count=batch_size
    )


def train_batches(
    data: PreferenceData,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Element `step` is this process's `PreferenceBatch` of global batch `step`.

    Index it (`ds[step]`) or iterate from a step (`ds.slice(slice(step, None))`,
    `.to_iter_dataset()` for prefetching); it never ends.
    """
    import grain

    process_index, process_count = _process(process_index, process_count)
    local = _local_slice(batch_size, process_index, process_count)
    n = len(data)
    if steps_per_epoch(n, batch_size) == 0:
        raise UserError(f"data.batch_size={batch_size} is larger than the {n} training rows kept")
    order = epoch_order(n, seed)
    seq = data.seq_lengths
    buckets = bucket_lengths(data.max_length, SMALLEST_BUCKET)

    def make(step: int) -> PreferenceBatch:
        rows = global_batch_rows(order, n, batch_size, step)
        seq_len = bucket_for(int(seq[rows].max()), buckets)
        mine = rows[local]
        return collate([data.pair(int(i)) for i in mine], mine, seq_len, data.special.pad)

    return grain.MapDataset.range(_UNBOUNDED).map(make)


def eval_batches(
    data: PreferenceData,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Every row once, in order; the last global batch is filled with padding pairs."""
    import grain

    process_index, process_count = _process(process_index, process_count)
    local = _local_slice(batch_size, process_index, process_count)
    n = len(data)
    seq = data.seq_lengths
    buckets = bucket_lengths(data.max_length, SMALLEST_BUCKET)

    def make(b: int) -> PreferenceBatch:
        rows = np.arange(b * batch_size, min((b + 1) * batch_size, n))
        seq_len = bucket_for(int(seq[rows].max()), buckets)
        mine = rows[local]  # may be short, or empty, on the last batch
        return collate(
            [data.pair(int(i)) for i in mine],
            mine,
            seq_len,
            data.special.pad,
            num_pairs=local.stop - local.start,
        )

    return grain.MapDataset.range(math.ceil(n / batch_size)).map(make)


@dataclass
class BatchPlan:
    """What one epoch of training batches looks like (epoch 0, for the configured seed)."""

    batch_size: int
    seed: int
    steps_per_epoch: int
    remainder: int  # rows left out of each epoch (the last incomplete global batch)
    buckets: list[int]
    rows_per_bucket: dict[int, int]  # by each row's own length
    batches_per_bucket: dict[int, int]  # by each global batch's padded length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_plan(data: PreferenceData, batch_size: int, seed: int) -> BatchPlan:
    n = len(data)
    per_epoch = steps_per_epoch(n, batch_size)
    buckets = bucket_lengths(data.max_length, SMALLEST_BUCKET)
    seq = data.seq_lengths
    rows = {b: 0 for b in buckets}
    for length in seq:
        rows[bucket_for(int(length), buckets)] += 1
    batches = {b: 0 for b in buckets}
    order = epoch_order(n, seed) if per_epoch else None
    for step in range(per_epoch):
        idx = global_batch_rows(order, n, batch_size, step)
        batches[bucket_for(int(seq[idx].max()), buckets)] += 1
    return BatchPlan(
        batch_size, seed, per_epoch, n - per_epoch * batch_size, list(buckets), rows, batches
    )
