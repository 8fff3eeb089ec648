"""The recipe keys with a one-to-one counterpart in ours (`TABLE`, applied by `carry`),
and those with none (`NOT_CARRIED`, `SILENT`, listed by `not_carried`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmpo_jax.recipes.part import Part, Recipe, config_rule
from mmpo_jax.recipes.reading import as_bool, as_float, as_int, as_str, is_off


@dataclass(frozen=True)
class KeyMap:
    """How one recipe key becomes one of our keys: `path`, its value `parse(recipe's)`."""

    path: str
    parse: Callable[[Any], Any]
    # Asks mmpo_jax.config's rule for `path` first: a value it refuses is listed, with
    # `refused` as the reason (None: the rule's own words), instead of set.
    checked: bool = False
    refused: str | None = None
    # An empty value asks for nothing: it is read and not set.
    nonempty: bool = False


def _remat(value: Any) -> str:
    return "full" if as_bool(value) else "none"


def _grad_norm(value: Any) -> float:
    # transformers turns clipping off with 0 or null; ours with <= 0
    return 0.0 if value is None else as_float(value)


TABLE: dict[str, KeyMap] = {
    "model_name_or_path": KeyMap("model.path", as_str, nonempty=True),
    "gradient_checkpointing": KeyMap("model.remat", _remat),
    "max_length": KeyMap("data.max_length", as_int, checked=True),
    "data_seed": KeyMap("data.seed", as_int),
    # the handbook sets it on the tokenizer before tokenizing, as ours does with this key
    "chat_template": KeyMap("data.chat_template", as_str, nonempty=True),
    "beta": KeyMap(
        "loss.beta",
        as_float,
        checked=True,
        refused="ours needs beta > 0; loss.beta keeps its default",
    ),
    "label_smoothing": KeyMap(
        "loss.label_smoothing", as_float, checked=True, refused="ours needs it in [0, 0.5)"
    ),
    "mmpo_reward_epsilon": KeyMap("loss.reward_epsilon", as_float),
    "simpo_gamma": KeyMap("loss.gamma", as_float),
    "cpo_alpha": KeyMap("loss.cpo_alpha", as_float, checked=True),
    "alpha": KeyMap("loss.alphapo_alpha", as_float),
    "loss_weights": KeyMap("loss.loss_weights", lambda v: [as_float(x) for x in v], nonempty=True),
    "f_divergence_type": KeyMap("loss.f_divergence_type", as_str),
    "f_alpha_divergence_coef": KeyMap("loss.f_alpha_divergence_coef", as_float),
    "discopop_tau": KeyMap("loss.discopop_tau", as_float, checked=True),
    "use_weighting": KeyMap("loss.use_weighting", as_bool),
    "ld_alpha": KeyMap("loss.ld_alpha", as_float),
    "learning_rate": KeyMap(
        "optim.learning_rate",
        as_float,
        checked=True,
        refused="ours needs a learning rate > 0; keeps our default 5e-7",
    ),
    "weight_decay": KeyMap("optim.weight_decay", as_float, checked=True),
    "max_grad_norm": KeyMap("optim.max_grad_norm", _grad_norm),
    "adam_beta1": KeyMap("optim.b1", as_float, checked=True),
    "adam_beta2": KeyMap("optim.b2", as_float, checked=True),
    "adam_epsilon": KeyMap("optim.eps", as_float, checked=True),
    "output_dir": KeyMap("train.output_dir", as_str, nonempty=True),
    "run_name": KeyMap("train.run_name", as_str, nonempty=True),
    "sync_ref_model": KeyMap("model.sync_reference", as_bool),
    "ref_model_mixup_alpha": KeyMap("model.reference_mixup_alpha", as_float, checked=True),
    "ref_model_sync_steps": KeyMap("model.reference_sync_steps", as_int, checked=True),
}


def carry(recipe: Recipe, *keys: str) -> Part:
    """The recipe's values of `keys` (keys of TABLE), in that order, as ours."""
    part = Part(recipe)
    for key in keys:
        entry = TABLE[key]
        value = part.get(key, entry.parse)
        if value is None or (entry.nonempty and not value):
            continue
        rule = config_rule(entry.path, value) if entry.checked else None
        if rule is None:
            part.set(entry.path, value, key)
        else:
            part.skip(key, value, entry.refused or rule)
    return part


_NO_HUB = "ours does not talk to the Hugging Face Hub; upload the exported model yourself"
_LAUNCHER = "ours shards over the device mesh (mesh.*); torch launcher settings do not apply"
_NO_QUANT = (
    "ours has no quantized base weights (QLoRA): the frozen base is stored in model.param_dtype"
)

# Recipe keys ours has no counterpart for, and why. A falsy value asks for
# nothing, so such keys are read without being listed.
NOT_CARRIED: dict[str, str] = {
    "hub_model_id": _NO_HUB,
    "hub_model_revision": _NO_HUB,
    "hub_strategy": _NO_HUB,
    "hub_private_repo": _NO_HUB,
    "hub_token": _NO_HUB,
    "push_to_hub": _NO_HUB,
    "logging_dir": "ours writes logs to train.output_dir",
    "log_level": "ours has no log-level setting",
    "log_level_replica": "ours has no log-level setting",
    "logging_first_step": "ours logs every train.log_every steps",
    "attn_implementation": "ours picks its attention kernel with model.attention "
    "(auto: cuDNN on GPU with bfloat16, else XLA)",
    "use_flash_attention_2": "ours picks its attention kernel with model.attention "
    "(auto: cuDNN on GPU with bfloat16, else XLA)",
    "trust_remote_code": "ours implements the Llama family itself and runs no remote code",
    "preprocessing_num_workers": "ours tokenizes each source once and caches the ids; "
    "there is no worker count",
    "dataset_num_proc": "ours tokenizes each source once and caches the ids; "
    "there is no worker count",
    "remove_unused_columns": "ours reads only prompt / chosen / rejected",
    "overwrite_output_dir": "ours has no such switch: train.output_dir holds one run",
    "per_device_eval_batch_size": "ours evaluates in batches of data.batch_size",
    "eval_accumulation_steps": "ours evaluates in batches of data.batch_size",
    "ddp_timeout": _LAUNCHER,
    "ddp_find_unused_parameters": _LAUNCHER,
    "ddp_backend": _LAUNCHER,
    "deepspeed": _LAUNCHER,
    "fsdp": _LAUNCHER,
    "fsdp_config": _LAUNCHER,
    "local_rank": _LAUNCHER,
    "tf32": "XLA picks the matmul precision; ours computes in model.compute_dtype",
    "torch_compile": "ours is compiled by XLA",
    "dataloader_num_workers": "ours builds batches with grain in the training process",
    "dataloader_pin_memory": "ours builds batches with grain in the training process",
    "dataloader_persistent_workers": "ours builds batches with grain in the training process",
    "auto_insert_empty_system_msg": "ours renders conversations with the chat template "
    "(data.chat_template, else the tokenizer's) as they are (no system message is inserted)",
    "truncation_side": "ours cuts prompts from the left and completions from the right",
    "use_liger_kernel": "ours computes log-probs with its own chunked LM head",
    "use_liger_loss": "ours computes log-probs with its own chunked LM head",
    "generate_during_eval": "ours does not generate during eval",
    "include_tokens_per_second": "ours has no such metric switch",
    "include_num_input_tokens_seen": "ours has no such metric switch",
    "resume_from_checkpoint": "ours has no such key",
    "save_only_model": "ours saves the whole train state",
    "save_safetensors": "ours saves orbax checkpoints (and exports HF directories)",
    "padding_value": "ours pads with the tokenizer's pad id",
    "label_pad_token_id": "ours masks padding with loss_mask",
    "model_init_kwargs": "ours loads checkpoints itself",
    "ref_model_init_kwargs": "ours loads checkpoints itself",
    "force_use_ref_model": "ours picks the reference with model.reference",
    "ref_adapter_name": "ours picks the reference with model.reference",
    "model_adapter_name": "ours picks the reference with model.reference",
    "tools": "ours renders no tool definitions",
    "use_logits_to_keep": "ours computes log-probs of completion positions only, always",
    "load_in_4bit": _NO_QUANT,
    "load_in_8bit": _NO_QUANT,
    "bnb_4bit_quant_type": _NO_QUANT,
    "bnb_4bit_quant_storage": _NO_QUANT,
    "use_bnb_nested_quant": _NO_QUANT,
    "lr_scheduler_kwargs": "ours' schedules take no extra arguments",
    "optim_args": "ours' AdamW takes only optim.b1, b2, eps and weight_decay",
    "eval_on_start": "ours evaluates before and after training when data.test_files is set",
}

# Keys read with no counterpart needed: they select what ours always does.
SILENT = frozenset({"do_train", "do_eval", "log_on_each_node", "disable_dropout"})


def not_carried(recipe: Recipe, read: set[str]) -> Part:
    """The recipe's NOT_CARRIED keys that ask for something, unless a rule already `read`
    them; the SILENT keys read."""
    part = Part(recipe)
    for key, reason in NOT_CARRIED.items():
        if key not in recipe or key in read:
            continue
        value = part.raw(key)
        if not is_off(value):
            part.skip(key, value, reason)
    for key in SILENT:
        if key in recipe:
            part.raw(key)
    return part
