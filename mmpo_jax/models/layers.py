"""Building blocks of the decoder: parameters with logical axis names, dropout,
RMSNorm (Llama's and Gemma's), the MLP activations, and applying RoPE
(transformers' rotate-half convention; the frequencies are `mmpo_jax.models.rope`'s)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


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
    """RMSNorm over the last axis. `offset` (Gemma): the scale is `1 + weight` (the
    weight starts at 0) and applies in float32 before the cast back; otherwise (Llama)
    the normalised value is cast back first and scaled by `weight` (starts at 1), as
    transformers does each."""

    def __init__(self, dim: int, eps: float, dtype: Any, *, rngs: nnx.Rngs, offset: bool = False):
        self.weight = param(rngs, (dim,), ("norm",), dtype, "zeros" if offset else "ones", 0.0)
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        if self.offset:
            return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


ACTIVATION_FNS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, N, H]`; cos/sin `[T, H]` in x's dtype (transformers' rotate-half form)."""
    return x * cos[None, :, None, :] + _rotate_half(x) * sin[None, :, None, :]


def apply_rope_rows(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`apply_rope` with per-row positions: x `[B, T, N, H]`; cos/sin `[B, T, H]`."""
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]
