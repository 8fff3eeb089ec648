"""`convert_recipe`: the rules applied in turn, each one's result handed to the next
that needs it, and merged into one `Conversion`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmpo_jax.errors import UserError
from mmpo_jax.recipes.data import data
from mmpo_jax.recipes.loss import loss
from mmpo_jax.recipes.model import lora, model
from mmpo_jax.recipes.optim import optim
from mmpo_jax.recipes.part import Conversion, Part, Recipe, recipe_key
from mmpo_jax.recipes.steps import batch_and_steps
from mmpo_jax.recipes.table import not_carried
from mmpo_jax.recipes.train import train

SECTIONS = ("model", "data", "loss", "optim", "mesh", "train")


def convert_recipe(
    recipe: Mapping[str, Any],
    *,
    devices: int = 1,
    train_rows: int | None = None,
    loss_name: str | None = None,
) -> Conversion:
    """Our config (only the keys the recipe sets) from an alignment-handbook / TRL recipe.

    `devices`: how many devices the recipe's per-device batch ran on (sets the
    global batch); `train_rows`: the number of training pairs (turns epochs into
    steps); `loss_name`: our loss, when an override sets it (then the recipe's
    own loss keys are not needed and an unsupported `loss_type` is no error).
    """
    if not isinstance(recipe, Mapping):
        raise UserError(
            f"a recipe must be a mapping of recipe keys, got a {type(recipe).__name__}"
        )
    if devices < 1:
        raise UserError(f"--devices {devices}: must be >= 1")
    if train_rows is not None and train_rows < 1:
        raise UserError(f"--train-rows {train_rows}: must be >= 1")
    recipe = dict(recipe)
    # The order of the rules is the order of the keys in our sections and of the notes.
    model_part = model(recipe)
    lora_part = lora(recipe)
    batch_part, length = batch_and_steps(recipe, devices, train_rows)
    data_part = data(recipe)
    parts = [
        model_part,
        lora_part,
        batch_part,
        data_part,
        loss(recipe, loss_name),
        optim(recipe, length.total_steps, lora="model.lora.rank" in lora_part.values),
        train(
            recipe,
            length,
            data_seeded="data.seed" in data_part.values,
            test_data="data.test_files" in data_part.values,
        ),
    ]
    read = set().union(*(p.read for p in parts))
    parts.append(not_carried(recipe, read))
    parts.append(_unknown(recipe, read | parts[-1].read))
    return _merge(recipe, parts)


def _unknown(recipe: Recipe, read: set[str]) -> Part:
    part = Part(recipe, read=set(read))
    for key, value in recipe.items():
        if key not in part.read:
            part.skip(
                key,
                value,
                "not a key this converter knows (alignment-handbook, TRL DPO/CPO, SimPO or "
                "the MMPO fork): check what it does and set the matching key by hand",
            )
    return part


def _merge(recipe: Recipe, parts: list[Part]) -> Conversion:
    """One Conversion of `parts` in order: a key set again keeps its first place, the
    not-carried keys follow the recipe's order."""
    whole = Part(recipe)
    for part in parts:
        whole.add(part)
    config: dict[str, Any] = {}
    for path, value in whole.values.items():
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    order = {k: i for i, k in enumerate(recipe)}
    skipped = sorted(whole.skipped, key=lambda s: order.get(recipe_key(s.key), len(order)))
    return Conversion(
        config={s: config[s] for s in SECTIONS if s in config},
        sources=whole.sources,
        skipped=skipped,
        notes=whole.notes,
        keys_read=len(recipe),
    )
