"""Building blocks of the decoder: parameters with logical axis names, dropout,
RMSNorm, and RoPE (transformers' rotate-half convention)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax.models.llama_config import LlamaConfig


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any,
           init: str, scale: float) -> nnx.Param:
    """A parameter with logical axis names (`out_sharding` metadata, no eager sharding:
    names become mesh axes only through `mmpo_jax.sharding`)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        assert rngs is not None, "a random init needs rngs"
        value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: each element kept with probability `1 - rate`, scaled by `1 / (1 - rate)`."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any, *, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), ("norm",), dtype, "ones", 0.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # transformers: normalise in float32, cast back, then scale.
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * y


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """The RoPE inverse frequencies `[head_dim // 2]` (float32), as transformers computes them."""
    dim = cfg.head_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    kind, s = cfg.rope_type, cfg.rope_scaling or {}
    if kind == "linear":
        inv = inv / np.float32(s["factor"])
    elif kind == "llama3":
        factor = s["factor"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        low_wavelen = old / low
        high_wavelen = old / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, inv_l)
    return inv.astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, N, H]`; cos/sin `[T, H]` in x's dtype (transformers' rotate-half form)."""
    return x * cos[None, :, None, :] + _rotate_half(x) * sin[None, :, None, :]


def apply_rope_rows(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`apply_rope` with per-row positions: x `[B, T, N, H]`; cos/sin `[B, T, H]`."""
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]
