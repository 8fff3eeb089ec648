"""`mmpo-jax config [CONFIG] [key=value ...]`: print the resolved run config as YAML."""

from __future__ import annotations

import argparse

from mmpo_jax.commands.common import add_config_items, load_from_items
from mmpo_jax.config import config_to_yaml


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config")
    add_config_items(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(config_to_yaml(load_from_items(args.items)), end="")
    return 0
