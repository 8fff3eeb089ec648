"""The global batch and the run length: data.batch_size, optim.grad_accum, train.max_steps,
and the step counts of the `*_steps` keys."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mmpo_jax.config_schema import TrainConfig
from mmpo_jax.errors import UserError
from mmpo_jax.recipes.part import Part, Recipe, config_rule
from mmpo_jax.recipes.reading import as_float, as_int

# transformers' defaults a recipe relies on when it omits the key.
HF_PER_DEVICE_BATCH = 8
HF_EPOCHS = 3.0


@dataclass(frozen=True)
class RunLength:
    """What the later rules need of the batch and the run: pairs per optimizer step,
    steps per epoch (with --train-rows) and the run's total steps (None: not known)."""

    batch_size: int | None
    steps_per_epoch: int | None
    total_steps: int | None


def batch_and_steps(recipe: Recipe, devices: int, train_rows: int | None) -> tuple[Part, RunLength]:
    """data.batch_size = per-device batch x accumulation steps x `devices`, optim.grad_accum,
    and train.max_steps (from max_steps, or from num_train_epochs and `train_rows`)."""
    part = Part(recipe)
    per_device = part.get("per_device_train_batch_size", as_int)
    if not part.has("per_device_train_batch_size"):
        per_device = HF_PER_DEVICE_BATCH
        part.note(f"per_device_train_batch_size not given: transformers' default {per_device}")
    accum = part.get("gradient_accumulation_steps", as_int, 1)
    usable = True
    # A per-device batch is held to data.batch_size's rule: at least one pair.
    for key, value, ours in (
        ("per_device_train_batch_size", per_device, "data.batch_size"),
        ("gradient_accumulation_steps", accum, "optim.grad_accum"),
    ):
        rule = None if value is None else config_rule(ours, value)
        if rule is not None:
            part.skip(key, value, rule)
        usable = usable and value is not None and rule is None
    batch_size = steps_per_epoch = None
    if usable:
        batch_size = per_device * accum * devices
        part.set(
            "data.batch_size",
            batch_size,
            f"per_device_train_batch_size {per_device} x gradient_accumulation_steps {accum} "
            f"x {devices} device(s)",
        )
        part.set("optim.grad_accum", accum, "gradient_accumulation_steps")
        part.note(
            f"Assumed {devices} device(s) (--devices): the recipe's global batch is "
            f"per-device batch x accumulation steps x devices = {batch_size} pairs; "
            f"on {devices} device(s) each holds {per_device} pair(s) per micro-batch."
        )
    if train_rows is not None and batch_size:
        if train_rows < batch_size:
            raise UserError(
                f"--train-rows {train_rows} is fewer than one batch of "
                f"{batch_size} pairs (data.batch_size): no step would run"
            )
        steps_per_epoch = train_rows // batch_size
    length, total_steps = run_length(recipe, batch_size, steps_per_epoch, train_rows)
    part.add(length)
    return part, RunLength(batch_size, steps_per_epoch, total_steps)


def run_length(
    recipe: Recipe, batch_size: int | None, steps_per_epoch: int | None, train_rows: int | None
) -> tuple[Part, int | None]:
    """train.max_steps and the run's total steps: max_steps > 0 wins, as in transformers;
    else num_train_epochs x `steps_per_epoch` (None without --train-rows)."""
    part = Part(recipe)
    max_steps = part.get("max_steps", as_int)
    if max_steps is not None and max_steps > 0:
        part.set("train.max_steps", max_steps, "max_steps")
        if part.has("num_train_epochs"):
            part.skip(
                "num_train_epochs",
                part.raw("num_train_epochs"),
                "max_steps > 0 takes precedence, as in transformers",
            )
        return part, max_steps
    given = part.has("num_train_epochs")
    epochs = part.get("num_train_epochs", as_float) if given else HF_EPOCHS
    if epochs is None:
        return part, None
    if not given and steps_per_epoch is not None:
        part.note(f"num_train_epochs not given: transformers' default {HF_EPOCHS:g}")
    if epochs <= 0:
        part.skip("num_train_epochs", epochs, "must be > 0")
        return part, None
    if steps_per_epoch is None:
        reason = (
            "the number of steps needs the number of training pairs: pass --train-rows N "
            f"(or set train.max_steps); train.max_steps keeps our default {TrainConfig().max_steps}"
        )
        if given:
            part.skip("num_train_epochs", epochs, reason)
        else:
            part.note(f"num_train_epochs not given (transformers' default {HF_EPOCHS:g}): {reason}")
        return part, None
    # The small tolerance keeps 2.0 x 574 from becoming 1149 through rounding.
    total_steps = max(1, math.ceil(epochs * steps_per_epoch - 1e-9))
    part.set(
        "train.max_steps",
        total_steps,
        f"num_train_epochs {epochs:g} x {steps_per_epoch} steps per epoch "
        f"(--train-rows {train_rows} // batch {batch_size}; ours drops each "
        "epoch's last partial batch)",
    )
    return part, total_steps


def step_count(value: Any, total_steps: int | None) -> int:
    """An `*_steps` value as steps: a whole number >= 1, or a fraction (< 1) of
    `total_steps`; ValueError with the reason when it is neither."""
    number = as_float(value)
    if 0 < number < 1:
        if total_steps is None:
            raise ValueError("a fraction of the total steps, which is not known")
        return max(1, math.ceil(number * total_steps))
    if number < 1 or not number.is_integer():
        raise ValueError("expected a whole number >= 1 (or a fraction < 1)")
    return int(number)
