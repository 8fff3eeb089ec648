"""The optimizer rules: learning rate, schedule and warmup, AdamW's settings."""

from __future__ import annotations

import math

from mmpo_jax.config_schema import OptimConfig
from mmpo_jax.recipes.part import Part, Recipe
from mmpo_jax.recipes.reading import as_float, as_int, as_str
from mmpo_jax.recipes.table import carry

ADAMW_OPTIMS = frozenset(
    {
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_hf",
        "adamw_apex_fused",
        "adamw_torch_xla",
        "adamw_torch_npu_fused",
        "adamw_anyprecision",
    }
)
# bitsandbytes / torchao AdamW with quantized or paged state: the same update rule.
LOW_PRECISION_ADAMW = frozenset(
    {
        "adamw_8bit",
        "adamw_bnb_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
        "paged_adamw",
        "adamw_torch_4bit",
        "adamw_torch_8bit",
    }
)
SCHEDULES = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant",
    "constant_with_warmup": "constant",
}


def optim(recipe: Recipe, total_steps: int | None, lora: bool) -> Part:
    """optim.*; `total_steps`: the run's, for warmup_ratio (None: not known); `lora`: whether
    the conversion trains LoRA adapters (then weight decay reaches no bias or norm)."""
    part = carry(recipe, "learning_rate")
    part.add(schedule(recipe, total_steps))
    part.add(
        carry(recipe, "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon")
    )
    if part.values.get("optim.weight_decay", 0) > 0 and not lora:
        part.note(
            "weight_decay > 0: transformers exempts biases and norm weights from it; "
            "ours decays every trained parameter"
        )
    part.add(optimizer(recipe))
    return part


def schedule(recipe: Recipe, total_steps: int | None) -> Part:
    """optim.schedule and optim.warmup_steps (warmup_steps > 0 wins over warmup_ratio, as in
    transformers)."""
    part = Part(recipe)
    name = part.get("lr_scheduler_type", as_str)
    if not part.has("lr_scheduler_type"):
        name = "linear"
        part.set("optim.schedule", "linear", "transformers' default lr_scheduler_type")
    elif name in SCHEDULES:
        part.set("optim.schedule", SCHEDULES[name], "lr_scheduler_type")
    elif name is not None:
        part.skip(
            "lr_scheduler_type",
            name,
            "ours has cosine, linear and constant (after warmup) schedules; optim.schedule "
            f"keeps our default {OptimConfig().schedule}",
        )
    warmup_steps = part.get("warmup_steps", as_int)
    ratio = part.get("warmup_ratio", as_float)
    if name == "constant":
        # transformers' "constant" schedule ignores warmup.
        part.set("optim.warmup_steps", 0, "lr_scheduler_type constant (no warmup)")
        for key, value in (("warmup_steps", warmup_steps), ("warmup_ratio", ratio)):
            if value:
                part.skip(key, value, "transformers' constant schedule has no warmup")
        return part
    if warmup_steps is not None and warmup_steps > 0:
        part.set("optim.warmup_steps", warmup_steps, "warmup_steps")
        if ratio:
            part.skip("warmup_ratio", ratio, "warmup_steps > 0 wins, as in transformers")
        return part
    if ratio is None or ratio == 0:
        if ratio == 0 or warmup_steps == 0:
            part.set("optim.warmup_steps", 0, "warmup_ratio" if ratio == 0 else "warmup_steps")
        return part
    if not 0 < ratio <= 1:
        part.skip("warmup_ratio", ratio, "must be in [0, 1]")
    elif total_steps is None:
        part.skip(
            "warmup_ratio",
            ratio,
            "needs the run's total steps: give max_steps, or num_train_epochs with "
            "--train-rows N; or set optim.warmup_steps",
        )
    else:
        # transformers' get_warmup_steps: ceil(total x ratio)
        steps = math.ceil(total_steps * ratio - 1e-9)
        part.set("optim.warmup_steps", steps, f"warmup_ratio {ratio:g} x {total_steps} steps")
    return part


def optimizer(recipe: Recipe) -> Part:
    """The recipe's `optim`: AdamW in any of transformers' forms is ours; others are listed."""
    part = Part(recipe)
    name = part.get("optim", as_str)
    if name is None or name in ADAMW_OPTIMS:
        if name is not None:
            part.note(f"optim {name}: ours is AdamW (optax.adamw)")
        return part
    if name in LOW_PRECISION_ADAMW:
        part.note(
            f"optim {name}: ours is AdamW with float32 moments (no 8-bit or paged state; "
            "optim.mu_dtype=bfloat16 halves the first moment)"
        )
        return part
    part.skip("optim", name, "ours is AdamW only")
    return part
