"""LoRA adapters on the decoder's projections, as PEFT computes them: the `A` / `B`
parameters of each targeted projection, their contribution
`scale * (dropout(x) @ A) @ B`, and merging them into the base weights for export."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax.models.layers import dropout
from mmpo_jax.models.options import LORA_TARGETS, LoraOptions


def add_lora_params(module: nnx.Module, lora: LoraOptions | None, rngs: nnx.Rngs, dtype: Any,
                 shapes: dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...], tuple[str, ...]]]) -> None:
    """Sets `<t>_lora_a` `[*in, rank]` / `<t>_lora_b` `[rank, *out]` on `module` for each
    target `t` in `shapes` (`t -> (in_shape, in_axes, out_shape, out_axes)`); None where
    not targeted. A is PEFT's default init (kaiming-uniform with a=sqrt(5): uniform in
    +-1/sqrt(fan_in)), B is zero, so the adapted model starts equal to the base."""
    for t, (in_shape, in_axes, out_shape, out_axes) in shapes.items():
        a = b = None
        if lora is not None and t in lora.targets:
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            # its own stream when there is one, so adding adapters leaves the base init unchanged
            key = rngs.lora() if "lora" in rngs else rngs.params()
            value = jax.random.uniform(key, (*in_shape, lora.rank), jnp.float32, -bound, bound)
            a = nnx.LoRAParam(value.astype(dtype), out_sharding=(*in_axes, "lora_rank"), eager_sharding=False)
            b = nnx.LoRAParam(jnp.zeros((lora.rank, *out_shape), dtype),
                              out_sharding=("lora_rank", *out_axes), eager_sharding=False)
        setattr(module, f"{t}_lora_a", a)
        setattr(module, f"{t}_lora_b", b)


def lora_delta(module: nnx.Module, t: str, x: jax.Array, lora: LoraOptions | None,
                key: jax.Array | None, compute_dtype: Any) -> jax.Array | None:
    """`scale * (dropout(x) @ A) @ B` of target `t` (None when `t` has no adapter).

    `x` `[B, T, *in]`; the result `[B, T, *out]`, added to the base projection."""
    a = getattr(module, f"{t}_lora_a")
    if a is None or lora is None:
        return None
    b = getattr(module, f"{t}_lora_b")
    if key is not None and lora.dropout > 0:
        x = dropout(x, lora.dropout, jax.random.fold_in(key, LORA_TARGETS.index(t)))
    a, b = a[...].astype(compute_dtype), b[...].astype(compute_dtype)
    n_in = a.ndim - 1
    xa = jnp.tensordot(x, a, axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))
    return (lora.scale * jnp.tensordot(xa, b, axes=((xa.ndim - 1,), (0,)))).astype(compute_dtype)


def add_delta(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta


def merge_lora(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """`W + scale * A @ B` in our layout: `w` `[*in, *out]`, `a` `[*in, r]`, `b` `[r, *out]`
    (float64 products, so the merge adds no rounding beyond float32's last bit)."""
    n_in = a.ndim - 1
    fan_in = math.prod(a.shape[:n_in])
    delta = a.reshape(fan_in, -1).astype(np.float64) @ b.reshape(b.shape[0], -1).astype(np.float64)
    return (w.astype(np.float64) + scale * delta.reshape(w.shape)).astype(np.float32)
