"""One source made ready: its rows checked and put in explicit-prompt form, token ids
computed once and cached (keyed by a fingerprint of the records, the tokenizer and
`formats.py`; its SHA-256 checked on every reuse), then truncated by lengths only."""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow.compute as pc

from mmpo_jax.data import formats
from mmpo_jax.data.formats import TOO_LONG, Layout, SpecialIds
from mmpo_jax.data.json_rows import BadLine, RawRows
from mmpo_jax.data.reports import SourceReport, check_invalid
from mmpo_jax.data.sources import SourceSpec, read_source
from mmpo_jax.errors import UserError, first_line
from mmpo_jax.files import write_text_atomic
from mmpo_jax.data.tokenizer_protocol import Tokenizer

if TYPE_CHECKING:

    from mmpo_jax.config_schema import DataConfig


CACHE_VERSION = "1"


# One source: check, tokenize (cached), truncate
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
    tokenizer: Tokenizer,
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
            assert reason is not None  # normalize_row gives a record or a reason
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
            _drop_bad_cache(cache_file, raw.name, log or _warn)
        fresh = not cache_file.exists()
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
        if cache_file is not None and fresh:
            _write_checksum(cache_file)
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


def _drop_bad_cache(cache_file: Path, name: str, say: Callable[[str], None]) -> None:
    """Deletes a tokenized-cache file that does not read back whole (cut by a full disk,
    overwritten) or whose bytes are not those written (bit rot, an edit: read as token
    ids, they would train on other text with no error), with a notice: left there, it
    would fail or skew every run until deleted by hand."""
    try:
        datasets.Dataset.from_file(str(cache_file))
    except Exception as err:  # pyarrow's OSError / ArrowInvalid, and whatever a bad file gives
        _remove_cache_file(cache_file)
        say(f"the tokenized cache of {name} ({cache_file}) cannot be read "
            f"({type(err).__name__}: {first_line(err)}); deleted it, tokenizing again")
        return
    mismatch = _checksum_mismatch(cache_file)
    if mismatch is not None:
        _remove_cache_file(cache_file)
        say(f"the tokenized cache of {name} ({cache_file}) {mismatch}; deleted it, tokenizing again")


def _checksum_file(cache_file: Path) -> Path:
    return cache_file.with_suffix(".sha256.json")


def _file_sum(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_checksum(cache_file: Path) -> None:
    """Records the size and SHA-256 of a cache file just written (as a checkpoint's files
    are), for `_checksum_mismatch` to check on every reuse."""
    write_text_atomic(_checksum_file(cache_file), json.dumps(_file_sum(cache_file)) + "\n")


def _checksum_mismatch(cache_file: Path) -> str | None:
    """How `cache_file` differs from its recorded checksum; None when it matches. A file
    without one (written by an older version, or cut off before its checksum) is not
    trusted either: tokenizing again costs once what a wrong cache would cost every run."""
    try:
        want = json.loads(_checksum_file(cache_file).read_text())
        want = {"bytes": int(want["bytes"]), "sha256": str(want["sha256"])}
    except FileNotFoundError:
        return "has no checksum to verify it by"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"has an unreadable checksum file ({type(err).__name__}: {first_line(err)})"
    have = _file_sum(cache_file)
    if have["bytes"] != want["bytes"]:
        return f"has {have['bytes']} bytes, not the {want['bytes']} written"
    if have["sha256"] != want["sha256"]:
        return "does not match its checksum (its bytes changed since it was written)"
    return None


def _warn(text: str) -> None:
    warnings.warn(text, stacklevel=3)


def _remove_cache_file(path: Path) -> None:
    # datasets.map writes a temporary file beside it and renames it when done (removing it
    # on an exception), with no sidecar files: the .arrow file and our checksum of it are
    # the whole cache entry.
    for entry in (path, _checksum_file(path)):
        with contextlib.suppress(OSError):
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def _progress_bars_off(off: bool) -> Iterator[None]:
    """datasets' progress bars off inside (when `off`), as they were outside."""
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
    tokenizer: Tokenizer,
    special: SpecialIds,
    cfg: DataConfig,
    report: SourceReport,
    quiet: bool,
) -> SourceData:
    """Tokenizes the records (or reads `cache_file`), truncates and checks the bad rows;
    `quiet`: without datasets' progress bar."""
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
