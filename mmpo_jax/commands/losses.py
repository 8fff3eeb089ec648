"""`mmpo-jax losses [CONFIG] [key=value ...] [--all] [--json]`: the loss on an example batch."""

from __future__ import annotations

import argparse
import json

from mmpo_jax.commands.common import add_config_items, load_from_items


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("losses", help="run the loss on an example batch and print its metrics")
    add_config_items(p)
    p.add_argument("--all", action="store_true", help="run mmpo, dpo and simpo")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmpo_jax.example import EXAMPLE_PAIRS, example_metrics

    cfg = load_from_items(args.items)
    names = ("mmpo", "dpo", "simpo") if args.all else (cfg.loss.name,)
    results = {name: example_metrics(cfg, name) for name in names}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name, metrics in results.items():
        print(f"== {name} on the example batch ({EXAMPLE_PAIRS} pairs) ==")
        width = max(len(k) for k in metrics)
        for key, value in metrics.items():
            print(f"  {key:<{width}}  {value: .6f}")
    return 0
