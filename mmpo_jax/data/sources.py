"""Where preference rows come from: local JSON lines / JSON / Parquet files, a hub
dataset (`datasets.load_dataset`), or the shipped demo data, read into raw rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mmpo_jax import storage
from mmpo_jax.data.builtin import demo_data_path
from mmpo_jax.data.json_rows import BadLines, RawRows, read_json_rows
from mmpo_jax.errors import UserError, first_line

if TYPE_CHECKING:

    from mmpo_jax.config_schema import DataConfig


Split = Literal["train", "test"]

JSON_SUFFIXES = (".json", ".jsonl")
PARQUET_SUFFIXES = (".parquet",)
DEMO_SOURCES = {"builtin:demo": "conversational", "builtin:demo-standard": "standard"}


# Sources
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
    every source with it before loading anything (a gs:// file is copied here first)."""
    path = Path(src.spec).expanduser()
    if path.suffix.lower() not in JSON_SUFFIXES + PARQUET_SUFFIXES:
        if storage.is_url(src.spec):
            raise UserError(f"{src.key}: '{src.spec}': a file in a bucket must be .json, .jsonl or .parquet")
        if src.spec not in DEMO_SOURCES and not path.exists() and looks_local(src.spec):
            # else datasets takes it for a hub id and retries the hub for half a minute
            raise UserError(f"{src.key}: no such file or directory '{src.spec}' (looked in "
                            f"{path.absolute().parent}); name a .jsonl, .json or .parquet file, or a hub "
                            "dataset id (owner/name)")
        return None
    if storage.is_url(src.spec):
        return Path(storage.fetched(src.spec, src.key))
    if not path.exists():
        raise UserError(f"{src.key}: no such file '{src.spec}' (looked in {path.absolute().parent})")
    if not path.is_file():
        raise UserError(f"{src.key}: '{src.spec}' is not a file")
    return path


def looks_local(spec: str) -> bool:
    """Whether `spec` can only be a local path, never a hub dataset id (`name` or `owner/name`):
    absolute, relative to `.` / `..` / `~`, deeper than one slash, or under a directory that
    exists here."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec.count("/") > 1:
        return True
    return "/" in spec and Path(spec).parent.is_dir()


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
    if src.split not in ("train", "test"):
        raise UserError(
            f"{src.key}={src.spec}: the demo data has splits train and test, not '{src.split}'"
        )
    raw = read_json_rows(demo_data_path(src.split, DEMO_SOURCES[src.spec]), src.key, bad_lines)
    raw.name = f"{src.spec} ({src.split})"
    return raw


def _read_parquet(path: Path, key: str, cache_dir: str | None) -> RawRows:
    # lazy: the command line reads this module (inspect-data's source names), and datasets takes ~1 s
    import datasets

    try:
        ds = datasets.load_dataset(
            "parquet", data_files=str(path), split="train", cache_dir=cache_dir
        )
    except Exception as err:  # a corrupt or non-parquet file
        raise UserError(f"{key}: cannot read '{path}' as parquet: {first_line(err)}") from None
    rows = ds.to_list()
    return RawRows(str(path), rows, list(range(1, len(rows) + 1)), "row", list(ds.column_names))


def _read_hub(src: SourceSpec, cache_dir: str | None) -> RawRows:
    import datasets  # lazy: as in `_read_parquet`

    try:
        ds = datasets.load_dataset(src.spec, split=src.split, cache_dir=cache_dir)
    except (
        Exception
    ) as err:  # offline, unknown id, unknown split, no access: all fixable by the user
        raise UserError(
            f"{src.key}: no such local file '{src.spec}', and loading it as a hub dataset "
            f"(split '{src.split}') failed: {type(err).__name__}: {first_line(err)}. "
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
