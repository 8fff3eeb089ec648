"""`mmpo-jax losses [CONFIG] [key=value ...] [--all] [--json]`: the loss on an example batch."""

from __future__ import annotations

import argparse
import json

from mmpo_jax.commands.common import add_config_items, load_from_items
from mmpo_jax.loss_registry import LOSS_NAMES, LOSSES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("losses", help="run the loss on an example batch and print its metrics")
    add_config_items(p)
    p.add_argument("--all", action="store_true", help=f"run every loss ({', '.join(LOSS_NAMES)})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def sft_normalisation(cfg, name: str = "sft") -> str:
    """How a token-mean loss (`sft`) normalises its NLL under `cfg` (the sentence the output shows)."""
    if cfg.loss.name == name and cfg.loss.average_logps:
        return "mean over pairs of each chosen answer's per-token NLL (loss.average_logps=true)"
    return "token-mean NLL over all chosen-answer tokens of the batch (TRL SFTTrainer's)"


def run(args: argparse.Namespace) -> int:
    from mmpo_jax.example import EXAMPLE_PAIRS, EXAMPLE_TOKENS, example_metrics

    cfg = load_from_items(args.items)
    names = LOSS_NAMES if args.all else (cfg.loss.name,)
    results = {name: example_metrics(cfg, name) for name in names}
    if args.json:
        # {loss name: metrics} only, so every value reads as metrics (the text output
        # says how sft is normalised)
        print(json.dumps(results, indent=2))
        return 0
    for name, metrics in results.items():
        print(f"== {name} on the example batch ({EXAMPLE_PAIRS} pairs) ==")
        if LOSSES[name].token_mean:
            print(f"  normalisation: {sft_normalisation(cfg, name)}; "
                  f"the example's answers count {EXAMPLE_TOKENS:g} tokens each")
        width = max(len(k) for k in metrics)
        for key, value in metrics.items():
            print(f"  {key:<{width}}  {value: .6f}")
    return 0
