"""`mmpo-jax convert-config RECIPE.yaml [key=value ...]`: a handbook / TRL recipe as our config.

Reads a DPO / SimPO / MMPO recipe (the flat YAML of alignment-handbook's
`run_dpo.py`, the MMPO authors' fork of it, TRL's DPO/CPO scripts) and prints
our config YAML: each value with a comment naming the recipe key it came from,
and at the top, as comments, the assumptions made and every recipe key that
could not be carried over with the reason. So

    mmpo-jax convert-config recipe.yaml --devices 4 --train-rows 73494 > run.yaml

gives a file that loads as it is. Overrides apply after the conversion and the
result is validated like any config (a bad value stops with the key named).
The conversion rules are in `mmpo_jax/recipes/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmpo_jax import recipes
from mmpo_jax.errors import UserError
from mmpo_jax.files import write_text_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-config",
        help="convert an alignment-handbook / TRL DPO recipe to our config",
        description="Print our config for an alignment-handbook / TRL DPO, SimPO or MMPO "
        "recipe, listing each recipe key that could not be carried over and why.",
    )
    p.add_argument("recipe", metavar="RECIPE", help="the recipe YAML file")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="our config overrides, applied after the conversion (e.g. data.batch_size=64)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="devices the recipe's per_device_train_batch_size ran on (default 1): "
        "data.batch_size = per-device batch x gradient_accumulation_steps x devices",
    )
    p.add_argument(
        "--train-rows",
        type=int,
        default=None,
        metavar="N",
        help="training pairs in the data; turns num_train_epochs (and warmup_ratio) into steps",
    )
    p.add_argument("--out", metavar="FILE", help="write the config to FILE instead of stdout")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: config, sources, notes, not_carried",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for item in args.overrides:
        if "=" not in item:
            raise UserError(
                f"'{item}' is not a key=value override (convert-config takes one recipe file, "
                "then overrides like data.batch_size=64)"
            )
    recipe = recipes.read_recipe(args.recipe)
    conversion = recipes.convert_recipe(
        recipe,
        devices=args.devices,
        train_rows=args.train_rows,
        loss_name=_override_value(args.overrides, "loss.name"),
    )
    config, _ = recipes.finalize(conversion, args.overrides)
    name = Path(args.recipe).name
    if args.json:
        text = json.dumps(recipes.to_json(config, conversion, name), indent=2, default=str) + "\n"
    else:
        text = recipes.render_yaml(config, conversion, name)
    if args.out:
        out = Path(args.out)
        if out.resolve() == Path(args.recipe).resolve():
            raise UserError(f"--out {out}: that is the recipe itself; write elsewhere")
        write_text_atomic(out, text)  # an interrupted write leaves the old file whole
        print(f"mmpo-jax: wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if conversion.skipped and not args.json:
        # Stderr, so a redirected run still says that something was left behind.
        print(
            f"mmpo-jax: {len(conversion.skipped)} recipe key(s) not carried over; "
            "they are listed, with the reasons, in the comments at the top of the config",
            file=sys.stderr,
        )
    return 0


def _override_value(overrides: list[str], key: str) -> str | None:
    """The value an override gives `key` (the last one wins, as in load_config), or None."""
    value = None
    for item in overrides:
        name, _, text = item.partition("=")
        if name.strip() == key:
            value = text.strip()
    return value
