"""The model rules: checkpoint and tokenizer, precision, rematerialisation, LoRA."""

from __future__ import annotations

import math

from mmpo_jax.recipes.part import Part, Recipe, config_rule
from mmpo_jax.recipes.reading import (
    as_bool,
    as_float,
    as_int,
    as_str,
    as_str_list,
    is_off,
)
from mmpo_jax.recipes.table import carry

# Our LoRA target names for the PEFT module names of the Llama family.
PEFT_TARGETS = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
# PEFT's own choice for Llama when `lora_target_modules` is not given.
PEFT_LLAMA_DEFAULT_TARGETS = ["q", "v"]
TRL_LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}
LORA_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_modules_to_save",
    "lora_task_type",
    "use_rslora",
    "use_dora",
)


def model(recipe: Recipe) -> Part:
    """model.path, data.tokenizer, the precision and model.remat."""
    part = carry(recipe, "model_name_or_path")
    path = part.values.get("model.path")
    tokenizer = part.get("tokenizer_name_or_path", as_str)
    if tokenizer:
        part.set("data.tokenizer", tokenizer, "tokenizer_name_or_path")
    elif path:
        # The handbook tokenizes with the model's own tokenizer and chat template.
        part.set("data.tokenizer", path, "model_name_or_path (the model's own tokenizer)")
    revision = part.get("model_revision", as_str)
    if revision not in (None, "main"):
        part.skip(
            "model_revision",
            revision,
            "ours loads a hub id's main branch: download that revision and set model.path "
            "to the directory",
        )
    part.add(precision(recipe))
    part.add(carry(recipe, "gradient_checkpointing"))
    part.add(carry(recipe, "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"))
    kwargs = part.raw("gradient_checkpointing_kwargs")
    if part.values.get("model.remat") == "full" and not is_off(kwargs):
        part.skip(
            "gradient_checkpointing_kwargs",
            kwargs,
            "ours rematerialises each layer with jax.checkpoint (model.remat); torch's "
            "checkpoint options do not apply",
        )
    return part


def precision(recipe: Recipe) -> Part:
    """model.compute_dtype and model.param_dtype from bf16 / fp16 / (torch_)dtype."""
    part = Part(recipe)
    dtype_key = "dtype" if part.has("dtype") else "torch_dtype"  # TRL renamed it in 2025
    dtype = part.get(dtype_key, as_str)
    bf16 = part.get("bf16", as_bool)
    fp16 = part.get("fp16", as_bool)
    if fp16 or dtype == "float16":
        key = "fp16" if fp16 else dtype_key
        part.skip(
            key,
            True if fp16 else dtype,
            "ours has no float16; model.compute_dtype bfloat16 is the nearest",
        )
    if bf16:
        part.set("model.compute_dtype", "bfloat16", "bf16")
    elif dtype == "bfloat16":
        part.set("model.compute_dtype", "bfloat16", f"{dtype_key} (the weights compute in it)")
    elif bf16 is False and not fp16:
        part.set("model.compute_dtype", "float32", "bf16: false (float32 compute)")
    elif dtype == "float32" and not fp16:
        part.set("model.compute_dtype", "float32", dtype_key)
    if dtype in ("bfloat16", "float16"):
        part.set(
            "model.param_dtype",
            "float32",
            f"ours: {dtype_key} {dtype} is the load dtype; float32 master weights as the "
            "handbook's mixed-precision runs keep (bfloat16 halves parameter memory)",
        )
    elif dtype == "float32":
        part.set("model.param_dtype", "float32", dtype_key)
    elif dtype is not None:
        part.skip(
            dtype_key,
            dtype,
            "ours stores parameters in model.param_dtype (float32 or bfloat16), whatever "
            "the checkpoint's dtype",
        )
    return part


def lora(recipe: Recipe) -> Part:
    """model.lora from use_peft and the lora_* keys (TRL's defaults for those not given)."""
    part = Part(recipe)
    if not part.get("use_peft", as_bool, False):
        present = [k for k in LORA_KEYS if part.has(k)]
        for key in present:
            part.raw(key)
        if present:
            part.note("use_peft is false: the lora_* keys have no effect (full fine-tuning)")
        return part
    values = {}
    for key, default in TRL_LORA_DEFAULTS.items():
        value = part.get(key, as_int if key == "lora_r" else as_float)
        if not part.has(key):
            part.note(f"{key} not given: TRL's default {default:g}")
            value = default
        values[key] = value
    targets = _targets(part)
    rank, alpha, dropout = values["lora_r"], values["lora_alpha"], values["lora_dropout"]
    # Rank 0 is full fine-tuning in ours, not the LoRA the recipe asks for.
    if rank is None or rank < 1 or not targets:
        why = "no usable lora_r" if rank is None or rank < 1 else "no target ours can adapt"
        part.skip("use_peft", True, f"LoRA not converted ({why}): full fine-tuning instead")
        return part
    part.set("model.lora.rank", rank, part.origin("lora_r"))
    if alpha is not None:
        source = part.origin("lora_alpha")
        if part.get("use_rslora", as_bool, False):
            # rsLoRA scales by alpha / sqrt(rank); ours by alpha / rank.
            alpha = alpha * math.sqrt(rank)
            source = "lora_alpha x sqrt(lora_r) (use_rslora: ours scales by alpha / rank)"
        part.set("model.lora.alpha", alpha, source)
    if dropout is not None and config_rule("model.lora.dropout", dropout) is None:
        part.set("model.lora.dropout", dropout, part.origin("lora_dropout"))
    elif dropout is not None:
        part.skip("lora_dropout", dropout, "ours needs a dropout in [0, 1)")
    part.set("model.lora.targets", targets, part.origin("lora_target_modules", "PEFT's default"))
    if part.get("use_dora", as_bool, False):
        part.skip("use_dora", True, "ours has plain LoRA (no DoRA magnitude vector)")
    to_save = part.raw("lora_modules_to_save")
    if not is_off(to_save):
        part.skip("lora_modules_to_save", to_save, "ours trains only the adapters under LoRA")
    task = part.raw("lora_task_type")
    if task not in (None, "CAUSAL_LM"):
        part.skip("lora_task_type", task, "ours trains causal LMs (CAUSAL_LM)")
    return part


def _targets(part: Part) -> list[str]:
    """Our LoRA targets for lora_target_modules (listing the modules ours cannot adapt)."""
    if not part.has("lora_target_modules"):
        part.note("lora_target_modules not given: PEFT's default for Llama, q_proj and v_proj")
        return list(PEFT_LLAMA_DEFAULT_TARGETS)
    names = part.get("lora_target_modules", as_str_list)
    if names is None:
        return []
    if names in (["all-linear"], ["all_linear"]):
        return list(PEFT_TARGETS.values())
    ours = [PEFT_TARGETS[n] for n in names if n in PEFT_TARGETS]
    other = [n for n in names if n not in PEFT_TARGETS]
    if other:
        part.skip(
            "lora_target_modules",
            other,
            "ours puts adapters only on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
            "down_proj",
        )
    # PEFT adapts a module named twice once; ours refuses a repeated target.
    return list(dict.fromkeys(ours))
