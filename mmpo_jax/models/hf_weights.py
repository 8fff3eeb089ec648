"""transformers' tensors <-> our parameters for every family: one table of every
HF tensor (its name, our state path, both layouts and the conversions between them),
the names and shapes it lists, and the model's weights read out in transformers'
layout (LoRA merged) for export and for the PyTorch checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mmpo_jax.models.decoder import Decoder
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.lora import merge_lora

# one tensor's layout change: transformers' to ours, or back
Relayout = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class HFTensor:
    """One HF tensor: where it lives in our state and how the layouts map."""

    hf_name: str
    path: tuple[str, ...]  # our state path (without the layer index)
    layer: int | None  # the layer (None for embeddings, final norm, lm head)
    # our per-layer shape (without the `layers` axis)
    shape: tuple[int, ...]
    # transformers' shape
    hf_shape: tuple[int, ...]
    # to_ours(np hf array) -> our layout; to_hf(np ours) -> hf layout
    to_ours: Relayout = field(compare=False, default=lambda a: a)
    to_hf: Relayout = field(compare=False, default=lambda a: a)


def _linear_in_out(out_shape: tuple[int, ...], in_dim: int) -> tuple[Relayout, Relayout]:
    """torch [out, in] <-> ours [in, *out_shape]."""
    def to_ours(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.T).reshape((in_dim, *out_shape))

    def to_hf(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(in_dim, -1).T)

    return to_ours, to_hf


def _o_proj(h: int, hd: int, d: int) -> tuple[Relayout, Relayout]:
    """torch o_proj [d, h*hd] <-> ours [h, hd, d]."""
    def to_ours(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.T).reshape(h, hd, d)

    def to_hf(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(h * hd, d).T)

    return to_ours, to_hf


def _reshape(shape: tuple[int, ...], hf_shape: tuple[int, ...]) -> tuple[Relayout, Relayout]:
    def to_ours(a: np.ndarray) -> np.ndarray:
        return a.reshape(shape)

    def to_hf(a: np.ndarray) -> np.ndarray:
        return a.reshape(hf_shape)

    return to_ours, to_hf


def _tensor_table(cfg: DecoderConfig) -> list[HFTensor]:
    d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    m, v = cfg.intermediate_size, cfg.vocab_size
    out: list[HFTensor] = [HFTensor("model.embed_tokens.weight", ("embed_tokens",), None, (v, d), (v, d))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.append(HFTensor(p + "input_layernorm.weight", ("input_layernorm", "weight"), i, (d,), (d,)))
        out.append(HFTensor(p + "self_attn.q_proj.weight", ("self_attn", "q_kernel"), i, (d, h, hd), (h * hd, d),
                           *_linear_in_out((h, hd), d)))
        if cfg.attention_bias:
            out.append(HFTensor(p + "self_attn.q_proj.bias", ("self_attn", "q_bias"), i, (h, hd), (h * hd,),
                               *_reshape((h, hd), (h * hd,))))
        out.append(HFTensor(p + "self_attn.k_proj.weight", ("self_attn", "k_kernel"), i, (d, k, hd), (k * hd, d),
                           *_linear_in_out((k, hd), d)))
        if cfg.attention_bias:
            out.append(HFTensor(p + "self_attn.k_proj.bias", ("self_attn", "k_bias"), i, (k, hd), (k * hd,),
                               *_reshape((k, hd), (k * hd,))))
        out.append(HFTensor(p + "self_attn.v_proj.weight", ("self_attn", "v_kernel"), i, (d, k, hd), (k * hd, d),
                           *_linear_in_out((k, hd), d)))
        if cfg.attention_bias:
            out.append(HFTensor(p + "self_attn.v_proj.bias", ("self_attn", "v_bias"), i, (k, hd), (k * hd,),
                               *_reshape((k, hd), (k * hd,))))
        if cfg.qk_norm:
            out.append(HFTensor(p + "self_attn.q_norm.weight", ("self_attn", "q_norm", "weight"), i, (hd,), (hd,)))
            out.append(HFTensor(p + "self_attn.k_norm.weight", ("self_attn", "k_norm", "weight"), i, (hd,), (hd,)))
        out.append(HFTensor(p + "self_attn.o_proj.weight", ("self_attn", "o_kernel"), i, (h, hd, d), (d, h * hd),
                           *_o_proj(h, hd, d)))
        if cfg.o_bias:
            out.append(HFTensor(p + "self_attn.o_proj.bias", ("self_attn", "o_bias"), i, (d,), (d,)))
        out.append(HFTensor(p + "post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), i,
                           (d,), (d,)))
        if cfg.family.gemma_norms:
            for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
                out.append(HFTensor(p + f"{norm}.weight", (norm, "weight"), i, (d,), (d,)))
        out.append(HFTensor(p + "mlp.gate_proj.weight", ("mlp", "gate_kernel"), i, (d, m), (m, d),
                           *_linear_in_out((m,), d)))
        out.append(HFTensor(p + "mlp.up_proj.weight", ("mlp", "up_kernel"), i, (d, m), (m, d),
                           *_linear_in_out((m,), d)))
        out.append(HFTensor(p + "mlp.down_proj.weight", ("mlp", "down_kernel"), i, (m, d), (d, m),
                           *_linear_in_out((d,), m)))
    out.append(HFTensor("model.norm.weight", ("norm", "weight"), None, (d,), (d,)))
    if not cfg.tie_word_embeddings:
        out.append(HFTensor("lm_head.weight", ("lm_head",), None, (d, v), (v, d),
                           *_linear_in_out((v,), d)))
    return out


def hf_weight_names(cfg: DecoderConfig) -> list[str]:
    """transformers' tensor names of this architecture, in module order.

    `model.embed_tokens.weight`, `model.layers.{i}.input_layernorm.weight`,
    `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` (+ q/k/v `.bias` with
    `attention_bias`, o too where `o_bias`; `self_attn.{q,k}_norm.weight` with `qk_norm`),
    `model.layers.{i}.post_attention_layernorm.weight` (and Gemma's
    `pre_feedforward_layernorm.weight`, `post_feedforward_layernorm.weight`),
    `model.layers.{i}.mlp.{gate,up,down}_proj.weight`, `model.norm.weight`, and
    `lm_head.weight` when the embeddings are untied.
    """
    return [t.hf_name for t in _tensor_table(cfg)]


def hf_weight_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """transformers' shape of each tensor of `hf_weight_names(cfg)`."""
    return {t.hf_name: t.hf_shape for t in _tensor_table(cfg)}


def group_by_param(cfg: DecoderConfig, scan: bool) -> dict[tuple, list[HFTensor]]:
    """Our state path (as a tuple of str/int keys) -> the HF tensors that fill it
    (several, one per layer, when the layers are stacked)."""
    groups: dict[tuple, list[HFTensor]] = {}
    for t in _tensor_table(cfg):
        key: tuple[str | int, ...]
        if t.layer is None:
            key = t.path
        elif scan:
            key = ("layers", *t.path)
        else:
            key = ("layers", t.layer, *t.path)
        groups.setdefault(key, []).append(t)
    return groups


def state_key(path: tuple) -> tuple:
    return tuple(int(p) if isinstance(p, int) else str(p) for p in path)


def iter_hf_weights(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """`(hf_name, float32 numpy in transformers' layout)`, one tensor at a time, in
    `hf_weight_names` order. Each tensor is gathered to the host on its own (a
    stacked layer parameter is read one layer slice at a time)."""
    cfg = model.cfg
    scan = model.options.scan_layers
    lora = model.options.lora
    state = nnx.state(model, nnx.Param)

    def read(path: tuple[str, ...], layer: int | None) -> np.ndarray | None:
        node: Any = state
        if layer is not None:
            node = node["layers"]
            if not scan:
                node = node[layer]
        for p in path[:-1]:
            node = node[p]
        if path[-1] not in node:
            return None
        node = node[path[-1]]
        value = node.get_value() if hasattr(node, "get_value") else node.value
        if layer is not None and scan:
            value = value[layer]
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            value = multihost_utils.process_allgather(value, tiled=True)
        return np.asarray(jax.device_get(value)).astype(np.float32)

    for t in _tensor_table(cfg):
        host = read(t.path, t.layer)
        if host is None:
            raise AssertionError(f"the model has no parameter {t.path} for {t.hf_name}")  # a bug here
        if lora is not None and t.path[-1].endswith("_kernel"):
            target = t.path[-1].removesuffix("_kernel")
            a = read((*t.path[:-1], f"{target}_lora_a"), t.layer)
            b = read((*t.path[:-1], f"{target}_lora_b"), t.layer)
            if a is not None and b is not None:
                host = merge_lora(host, a, b, lora.scale)
        yield t.hf_name, t.to_hf(host)
