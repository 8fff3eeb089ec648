"""`mmpo-jax inspect-data CONFIG|SOURCE [key=value ...] [--json]`: the data, checked, before a run.

Loads and tokenizes the train (and test) data, and prints rows read, kept and
dropped by reason (with row numbers), truncation, token-length distributions,
the bucket histogram and one decoded example with its loss mask. Bad data
stops with the same error a run would give (exit 2).

The first item is a YAML config file (`.yaml`/`.yml`: its `data` section is
used), or a data source: `builtin:demo`, `builtin:demo-standard` or a
`.json`/`.jsonl`/`.parquet` file, read as `data.train_files=SOURCE` with no
test data and every other key at its default. `key=value` overrides follow:

    mmpo-jax inspect-data configs/demo.yaml
    mmpo-jax inspect-data builtin:demo
    mmpo-jax inspect-data prefs.jsonl data.tokenizer=Qwen/Qwen2.5-0.5B-Instruct --json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mmpo_jax.commands.common import load_from_items
from mmpo_jax.config import apply_overrides, config_from_dict
from mmpo_jax.data.sources import DEMO_SOURCES, JSON_SUFFIXES, PARQUET_SUFFIXES

if TYPE_CHECKING:
    from mmpo_jax.config_schema import RunConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect-data",
        help="load and tokenize the configured data (or a data file) and report on it",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG|SOURCE|key=value",
        help="a YAML config file or a data source (builtin:demo, a .jsonl/.json/.parquet "
        "file), then overrides",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the report loads jax (the batches) and datasets, which `mmpo-jax --help` does not need
    from mmpo_jax.data.inspection import inspect_data, report_lines

    run_cfg = config_from_items(args.items)
    result = inspect_data(run_cfg)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(report_lines(result, run_cfg.data)))
    return 0


def is_data_source(item: str) -> bool:
    """A data source rather than a config file: a demo name or a data file's path."""
    return item in DEMO_SOURCES or item.lower().endswith(JSON_SUFFIXES + PARQUET_SUFFIXES)


def config_from_items(items: Sequence[str]) -> RunConfig:
    """The config of `CONFIG [key=value ...]`, or of `SOURCE [key=value ...]`: the
    defaults with `data.train_files=SOURCE`."""
    if items and "=" not in items[0] and is_data_source(items[0]):
        # Set as a value, not parsed as an override: a path may hold YAML's ': ' or '#'.
        return config_from_dict(apply_overrides({"data": {"train_files": items[0]}}, items[1:]))
    return load_from_items(items)
