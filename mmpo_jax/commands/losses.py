"""`mmpo-jax losses [CONFIG] [key=value ...] [--all] [--json]`: the loss on an example batch."""

from __future__ import annotations

import argparse
import dataclasses
import json

from mmpo_jax.commands.common import add_config_items, load_from_items
from mmpo_jax.config_schema import LossConfig, RunConfig
from mmpo_jax.config_settle import settle_loss
from mmpo_jax.losses.declarations import CPO_LOSS_TYPES, DPO_LOSS_TYPES, LOSS_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("losses", help="run the loss on an example batch and print its metrics")
    add_config_items(p)
    p.add_argument("--all", action="store_true",
                   help=f"run every loss ({', '.join(LOSS_NAMES)}) and every DPO and CPO loss type")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def sft_normalisation(cfg: RunConfig, name: str = "sft") -> str:
    """How a token-mean loss (`sft`) normalises its NLL under `cfg` (the sentence the output shows)."""
    if cfg.loss.name == name and cfg.loss.average_logps:
        return "mean over pairs of each chosen answer's per-token NLL (loss.average_logps=true)"
    return "token-mean NLL over all chosen-answer tokens of the batch (TRL SFTTrainer's)"


def every_loss(cfg: RunConfig) -> dict[str, RunConfig]:
    """`--all`: `cfg` with each loss at its defaults (the configured one as configured),
    then `dpo:<type>` / `cpo:<type>` for every other loss type and `dpo:sigmoid+sft`
    (RPO's mixture)."""
    out = {name: cfg if name == cfg.loss.name else
           dataclasses.replace(cfg, loss=settle_loss(LossConfig(name=name))) for name in LOSS_NAMES}
    variants: list[tuple[str, tuple[str, ...]]] = [("dpo", (kind,)) for kind in DPO_LOSS_TYPES if kind != "sigmoid"]
    variants += [("cpo", (kind,)) for kind in CPO_LOSS_TYPES if kind != "sigmoid"]
    variants.append(("dpo", ("sigmoid", "sft")))
    for name, kinds in variants:
        loss = settle_loss(LossConfig(name=name, loss_type=kinds[0] if len(kinds) == 1 else list(kinds),
                                      label_smoothing=1e-3 if "exo_pair" in kinds else 0.0))
        out[f"{name}:{'+'.join(kinds)}"] = dataclasses.replace(cfg, loss=loss)
    return out


def run(args: argparse.Namespace) -> int:
    # lazy: the example batch runs the JAX losses, and `mmpo-jax --help` needs no jax
    from mmpo_jax.example import EXAMPLE_PAIRS, EXAMPLE_TOKENS, example_metrics

    cfg = load_from_items(args.items)
    runs = every_loss(cfg) if args.all else {cfg.loss.name: cfg}
    results = {label: example_metrics(run_cfg, run_cfg.loss.name) for label, run_cfg in runs.items()}
    if args.json:
        # {loss name: metrics} only, so every value reads as metrics (the text output
        # says how sft is normalised)
        print(json.dumps(results, indent=2))
        return 0
    for name, metrics in results.items():
        print(f"== {name} on the example batch ({EXAMPLE_PAIRS} pairs) ==")
        if name == "sft":
            print(f"  normalisation: {sft_normalisation(cfg, name)}; "
                  f"the example's answers count {EXAMPLE_TOKENS:g} tokens each")
        width = max(len(k) for k in metrics)
        for key, value in metrics.items():
            print(f"  {key:<{width}}  {value: .6f}")
    return 0
