"""Helpers shared by subcommands: CONFIG [key=value ...] positional arguments."""

from __future__ import annotations

import argparse
from typing import Sequence

from mmpo_jax.config import load_config, split_config_and_overrides
from mmpo_jax.config_schema import RunConfig


def add_config_items(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items", nargs="*", metavar="CONFIG|key=value", help="a YAML config file, then overrides"
    )


def load_from_items(items: Sequence[str]) -> RunConfig:
    path, overrides = split_config_and_overrides(items)
    return load_config(path, overrides)
