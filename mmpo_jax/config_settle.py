"""The one place a run config's defaults that depend on other keys, and its `auto`s, are
settled.

    cfg = settle(cfg)    # on load: every default and auto the machine does not decide
    dtype = settled_compute_dtype(cfg.model.compute_dtype, "tpu")   # once the backend is known

A key left unset (None, "" or `auto`) in the YAML means "the default this section's
other keys or another section give"; `mmpo_jax.config.config_from_dict` checks what
the user wrote, then settles it here, so every settled value is valid by construction.
`model.compute_dtype` stays `auto` in a run's config.yaml and in `mmpo-jax config` (the
same file runs on a CPU and on a TPU); what reads it settles it for the backend it runs
or compiles for (a run's own, or the TPU aot-check compiles for from a CPU):
`ModelOptions.from_config` and the kernel refusals of `mmpo_jax.models.kernels`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from mmpo_jax.config_schema import DEFAULT_MAX_STEPS, DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig
from mmpo_jax.losses.declarations import REFERENCE_FREE_LOSSES, declaration_of, mixture

BUILTIN_PREFIX = "builtin:"  # `data.tokenizer: builtin:NAME`, a tokenizer shipped with the package


def settle(cfg: RunConfig) -> RunConfig:
    """`cfg` with every unset key at its default and `model.reference: auto` a mode
    (`model.compute_dtype` excepted: `settled_compute_dtype`, once the backend is known)."""
    return dataclasses.replace(
        cfg,
        model=_settle_reference(cfg.model, cfg.loss),
        data=_settle_data(cfg.data, cfg.model),
        loss=settle_loss(cfg.loss),
        train=_settle_train(cfg.train),
    )


def settle_loss(loss: LossConfig) -> LossConfig:
    """The `loss` section with `beta`, `average_logps` and `gamma` unset (None) at the
    loss's own defaults (`mmpo_jax.losses.declarations`); `LossConfig(name=n)` settled is
    loss `n` at its defaults."""
    declared = declaration_of(loss.name)
    average = declared.average_logps or any(kind in declared.averaged_types for kind in mixture(loss))
    return dataclasses.replace(
        loss,
        beta=declared.beta if loss.beta is None else loss.beta,
        average_logps=average if loss.average_logps is None else loss.average_logps,
        gamma=declared.option_default("gamma", 1.0) if loss.gamma is None else loss.gamma,
    )


def settled_compute_dtype(compute_dtype: str, backend: str) -> str:
    """`model.compute_dtype` for `backend` ("cpu", "gpu", "tpu"): auto is bfloat16 on GPU
    and TPU, float32 on CPU (where bfloat16 matmuls are emulated, slowly)."""
    if compute_dtype != "auto":
        return compute_dtype
    return "float32" if backend == "cpu" else "bfloat16"


def _settle_reference(model: ModelConfig, loss: LossConfig) -> ModelConfig:
    """`model.reference: auto`: none for a loss that reads no reference, lora_base with
    LoRA (no copy) unless another checkpoint is the reference, else separate."""
    if model.reference != "auto":
        return model
    if loss.name in REFERENCE_FREE_LOSSES:
        mode: Literal["none", "lora_base", "separate"] = "none"
    else:
        mode = "lora_base" if model.lora.rank > 0 and not model.reference_path else "separate"
    return dataclasses.replace(model, reference=mode)


def _settle_data(data: DataConfig, model: ModelConfig) -> DataConfig:
    """`data.tokenizer` unset: the model's own (`model.path`, whose tokenizer files or
    embedded GGUF tokenizer `load_tokenizer` reads, as TRL takes the model's), or
    builtin:tiny for a random init (reads no file: the tokenizer is loaded by the
    commands that need it). `data.pack_length` unset under packing: 2 x max_length, the
    longest pair the truncation allows (it stays None under packing none, so a run saved
    before packing existed reads the same)."""
    if not data.tokenizer:
        data = dataclasses.replace(data, tokenizer=model.path or f"{BUILTIN_PREFIX}tiny")
    if data.packing != "none" and data.pack_length is None:
        data = dataclasses.replace(data, pack_length=2 * data.max_length)
    return data


def _settle_train(train: TrainConfig) -> TrainConfig:
    """`train.max_steps` at its default when neither it nor `num_epochs` is given (a run
    resolves `num_epochs` to steps once the data is loaded: `mmpo_jax.train.run_config`)."""
    if train.max_steps is None and train.num_epochs is None:
        return dataclasses.replace(train, max_steps=DEFAULT_MAX_STEPS)
    return train
