"""`mmpo-jax losses [CONFIG] [key=value ...] [--all] [--json]`: the loss on an example batch."""

from __future__ import annotations

import argparse
import json

from mmpo_jax.commands.common import add_config_items, load_from_items

ALL_LOSSES = ("mmpo", "dpo", "simpo", "sft")
# The example batch's summed log-probs stand for completions of about this many tokens
# (see `mmpo_jax.example.example_logps`).
EXAMPLE_TOKENS = 40.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("losses", help="run the loss on an example batch and print its metrics")
    add_config_items(p)
    p.add_argument("--all", action="store_true", help="run mmpo, dpo, simpo and sft")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def sft_normalisation(cfg) -> str:
    """How `sft` normalises its NLL under `cfg` (the sentence the output shows)."""
    if cfg.loss.name == "sft" and cfg.loss.average_logps:
        return "mean over pairs of each chosen answer's per-token NLL (loss.average_logps=true)"
    return "token-mean NLL over all chosen-answer tokens of the batch (TRL SFTTrainer's)"


def sft_example_metrics(cfg) -> dict[str, float]:
    """SFT on the example batch, normalised as a run of `cfg` would (every chosen answer
    taken as EXAMPLE_TOKENS tokens long); `rewards/*` only when the run has a reference."""
    import jax.numpy as jnp

    from mmpo_jax import losses
    from mmpo_jax.example import EXAMPLE_PAIRS, example_logps

    batch = {k: jnp.asarray(v, jnp.float32) for k, v in example_logps(cfg.train.seed).items()}
    pc, pr = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    own = cfg.loss.name == "sft"
    average = own and bool(cfg.loss.average_logps)
    refs = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    if own and cfg.model.reference != "none":
        rc, rr = refs
    else:
        rc = rr = None
    if average:
        pc, pr = pc / EXAMPLE_TOKENS, pr / EXAMPLE_TOKENS
        rc, rr = (None, None) if rc is None else (rc / EXAMPLE_TOKENS, rr / EXAMPLE_TOKENS)
        tokens = None
    else:
        tokens = jnp.full((EXAMPLE_PAIRS,), EXAMPLE_TOKENS, jnp.float32)
    beta = cfg.loss.beta if own else 0.1
    _, metrics = losses.configured_loss(cfg.loss, pc, pr, rc, rr, chosen_tokens=tokens, name="sft", beta=beta)
    return {k: float(v) for k, v in metrics.items()}


def run(args: argparse.Namespace) -> int:
    from mmpo_jax.example import EXAMPLE_PAIRS, example_metrics

    cfg = load_from_items(args.items)
    names = ALL_LOSSES if args.all else (cfg.loss.name,)
    results = {name: sft_example_metrics(cfg) if name == "sft" else example_metrics(cfg, name)
               for name in names}
    if args.json:
        # {loss name: metrics} only, so every value reads as metrics (the text output
        # says how sft is normalised)
        print(json.dumps(results, indent=2))
        return 0
    for name, metrics in results.items():
        print(f"== {name} on the example batch ({EXAMPLE_PAIRS} pairs) ==")
        if name == "sft":
            print(f"  normalisation: {sft_normalisation(cfg)}; "
                  f"the example's answers count {EXAMPLE_TOKENS:g} tokens each")
        width = max(len(k) for k in metrics)
        for key, value in metrics.items():
            print(f"  {key:<{width}}  {value: .6f}")
    return 0
