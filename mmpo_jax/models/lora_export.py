"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names a Llama adapter `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
(`[rank, in]`, torch Linear layout) and `...lora_B.weight` (`[out, rank]`); ours are
`q_lora_a` `[*in, rank]` and `q_lora_b` `[rank, *out]` (heads split out), per layer or
stacked on a leading `layers` axis. `peft.PeftModel.from_pretrained(base, dir)` loads it.

`adapter_config.json` names the base (`base_model_name_or_path`) so that
`peft.AutoPeftModelForCausalLM.from_pretrained(dir)` opens it: a local directory by its
absolute path, a hub id as given (`peft_base_name`). A base PEFT cannot open (a GGUF
file, a gs:// URL) is written into the adapter's directory as an HF directory, `base/`
(its weights as loaded, adapters not merged), and that is the one named.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from mmpo_jax import storage
from mmpo_jax.errors import UserError
from mmpo_jax.models.export_dir import export_directory
from mmpo_jax.models.hf_export import write_hf_files
from mmpo_jax.models.hf_weights import iter_hf_weights
from mmpo_jax.paths import resolve

if TYPE_CHECKING:
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.models.decoder import Decoder

MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PARENT = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
          "gate": "mlp", "up": "mlp", "down": "mlp"}
# Inside the adapter's directory: the base model, when PEFT could not open `model.path`.
BASE_DIR = "base"


def iter_peft_weights(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """`(peft_name, float32 [torch layout])` of every adapter matrix, layer by layer."""
    lora = model.options.lora
    if lora is None:
        raise UserError("the run has no LoRA adapters (model.lora.rank is 0); export the full model instead")
    state = nnx.state(model, nnx.LoRAParam)
    scan = model.options.scan_layers
    for i in range(model.cfg.num_hidden_layers):
        layer = state["layers"] if scan else state["layers"][i]
        for t in lora.targets:
            node = layer[PARENT[t]]
            a = np.asarray(_value(node[f"{t}_lora_a"]), np.float32)
            b = np.asarray(_value(node[f"{t}_lora_b"]), np.float32)
            if scan:
                a, b = a[i], b[i]
            prefix = f"base_model.model.model.layers.{i}.{MODULES[t]}"
            yield f"{prefix}.lora_A.weight", a.reshape(-1, a.shape[-1]).T.copy()
            yield f"{prefix}.lora_B.weight", b.reshape(b.shape[0], -1).T.copy()


def peft_base_name(model_path: str) -> str | None:
    """What `adapter_config.json` names as the base of a run on `model_path`, or None when
    PEFT cannot open that base and it must be written beside the adapter (`BASE_DIR`).

    PEFT hands the name to transformers' `from_pretrained` as it is, so a relative path
    would be looked up from whatever directory the reader runs in, and `pkg:` is ours
    alone: a local directory is named by its absolute path (symlinks kept, as the user
    chose them). A GGUF file, local, in a package or on the hub, loads only with
    `gguf_file=`, which PEFT never passes; transformers reads no gs:// URL.
    """
    if storage.is_url(model_path):
        return None
    text = resolve(model_path)
    local = Path(text).expanduser()
    if local.suffix.lower() == ".gguf":
        return None
    if local.exists():
        return os.path.abspath(local)
    return text  # a hub id


def iter_base_hf_weights(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """`iter_hf_weights` of the base that `model`'s adapters apply to: its weights as loaded,
    the adapters not merged in (they are frozen in a LoRA run, so these are the base
    exactly, in the parameter dtype the adapters were trained against)."""
    # A second module over the same arrays (no copy) that reads as having no adapters:
    # iter_hf_weights merges whatever `options.lora` names.
    base = nnx.merge(*nnx.split(model))
    base.options = dataclasses.replace(model.options, lora=None)
    return iter_hf_weights(base)


def _value(var: Any) -> Any:
    value = var.get_value() if hasattr(var, "get_value") else var.value
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return jax.device_get(value)


def export_peft_adapter(
    model: Decoder,
    out_dir: str | os.PathLike,
    base_model: str,
    tokenizer: Tokenizer | None = None,
    *,
    base_dtype: str | None = None,
    overwrite: bool = False,
    about: dict[str, Any] | None = None,
) -> Path:
    """Writes the adapter of `model` (a LoRA policy) for `base_model` (hub id or path).

    With `base_dtype`, the base itself (`iter_base_hf_weights`, in that dtype, with the
    tokenizer) is written too, as an HF directory `out_dir/base`; `base_model` is then
    where that directory will be once the export is in place.

    `out_dir` is new, empty, or (with `overwrite`) an earlier export and nothing else; it
    is written beside it and renamed into place (`checkpoints.export_directory`), so a
    failure leaves `out_dir` as it was and no file of anyone else's is ever touched.
    """
    lora = model.options.lora
    tensors = dict(iter_peft_weights(model))
    if base_dtype is not None:
        about = {**(about or {}), "base_dir": BASE_DIR, "base_dtype": base_dtype}
    with export_directory(out_dir, kind="peft_adapter", overwrite=overwrite, about=about) as out:
        _write_adapter(out, tensors, lora, base_model, tokenizer)
        if base_dtype is not None:
            write_hf_files(out / BASE_DIR, model.cfg, tokenizer, iter_base_hf_weights(model), dtype=base_dtype)
    return Path(out_dir)


def _write_adapter(out: Path, tensors: dict[str, np.ndarray], lora: Any, base_model: str, tokenizer: Tokenizer | None) -> None:
    """The adapter's files, into the (temporary) directory `out`."""
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(MODULES[t].split(".")[-1] for t in lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
