"""Shared arithmetic of the preference losses: global means over real pairs, the
upcast and masking of the inputs, the global sort `aot` needs, TRL's reward metrics.

With `axis_name` (a mesh axis name or a tuple of them) a loss runs inside
`jax.shard_map` with the pairs split over those axes: every mean is a `lax.psum` of
local sums over a `lax.psum` of local real-pair counts, extremes are `lax.pmin` /
`lax.pmax`, so the result equals the single-device computation on the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
AxisName = str | tuple[str, ...] | None
Metrics = dict[str, Array]


def psum(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def _pmin(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else lax.pmin(x, axis_name)


def _pmax(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else lax.pmax(x, axis_name)


class Reducer:
    """Means over the real pairs of the global batch.

    Sums and counts are reduced separately and divided once, so the mean is
    exact however the pairs are split over devices.
    """

    def __init__(self, mask: Array, axis_name: AxisName):
        self.mask = mask  # [N] float, 0 or 1
        self.axis_name = axis_name
        self.count = psum(jnp.sum(mask), axis_name)  # scalar, global

    def mean(self, x: Array, mask: Array | None = None) -> Array:
        """Mean of `x` `[N]` over the global real pairs (0 when there are none); `mask`
        says where they are when `x` is not in batch order (`sorted_real_first`)."""
        where = self.mask if mask is None else mask
        total = psum(jnp.sum(jnp.where(where > 0, x, 0.0)), self.axis_name)
        return total / jnp.maximum(self.count, 1.0)

    # Extremes carry no gradient (lax.pmin/pmax have no differentiation rule,
    # and the contract stops the gradient of the normalisation statistics).
    def min(self, x: Array) -> Array:
        local = jnp.min(jnp.where(self.mask > 0, lax.stop_gradient(x), jnp.inf))
        return _pmin(local, self.axis_name)

    def max(self, x: Array) -> Array:
        local = jnp.max(jnp.where(self.mask > 0, lax.stop_gradient(x), -jnp.inf))
        return _pmax(local, self.axis_name)


def loss_dtype(*xs: Array) -> jnp.dtype:
    """At least float32: bfloat16/float16 inputs are upcast, float64 stays."""
    return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def prepare(
    arrays: tuple[Array, ...], pair_mask: Array | None
) -> tuple[tuple[Array, ...], Array]:
    """Upcasts the `[N]` inputs and zeroes the padding pairs.

    Returns the cleaned arrays and the mask as a float array `[N]`.
    """
    dtype = loss_dtype(*arrays)
    arrays = tuple(jnp.asarray(a).astype(dtype) for a in arrays)
    shape = arrays[0].shape
    for a in arrays:
        if a.ndim != 1 or a.shape != shape:
            raise ValueError(
                "preference losses take per-pair sequence log-probs of shape [N]; "
                f"got shapes {[tuple(x.shape) for x in arrays]}"
            )
    if pair_mask is None:
        mask = jnp.ones(shape, dtype)
    else:
        pair_mask = jnp.asarray(pair_mask)
        if pair_mask.shape != shape:
            raise ValueError(
                f"pair_mask has shape {tuple(pair_mask.shape)}, expected {shape} "
                "(one entry per pair)"
            )
        mask = (pair_mask > 0).astype(dtype)
    # `where` (not multiplication) so NaN/inf in padding pairs cannot leak.
    cleaned = tuple(jnp.where(mask > 0, a, jnp.zeros_like(a)) for a in arrays)
    return cleaned, mask


def reward_metrics(
    red: Reducer, chosen_rewards: Array, rejected_rewards: Array
) -> Metrics:
    """TRL's `rewards/*` from per-pair rewards `[N]`."""
    return {
        "rewards/chosen": red.mean(chosen_rewards),
        "rewards/rejected": red.mean(rejected_rewards),
        "rewards/margins": red.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": red.mean(
            (chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype)
        ),
    }


def stop_metrics(metrics: Metrics, loss: Array) -> Metrics:
    """Metrics are reported values, never differentiated (the loss excepted)."""
    return {k: (loss if k == "loss" else lax.stop_gradient(v)) for k, v in metrics.items()}


def sorted_real_first(x: Array, red: Reducer) -> tuple[Array, Array]:
    """This device's block of the GLOBAL batch's `x` `[N]` sorted ascending, real pairs
    first, and the `[N]` mask of real pairs in that block.

    The whole batch is gathered and sorted on every device (padding pairs after the
    real ones, by a key, not by a sentinel value); each device keeps the block at its
    own position, so sums over blocks (`red.mean(v, mask)`) cover the sorted batch
    once, and the gradient reaches every input through the gather.
    """
    axis = red.axis_name
    local = x.shape[0]
    gathered = x if axis is None else lax.all_gather(x, axis, tiled=True)
    mask = red.mask if axis is None else lax.all_gather(red.mask, axis, tiled=True)
    padding = (mask <= 0).astype(jnp.int32)
    _, ordered = lax.sort((padding, gathered), num_keys=2)
    real = (jnp.arange(ordered.shape[0]) < red.count).astype(x.dtype)
    if axis is None:
        return ordered, real
    start = lax.axis_index(axis) * local
    return (lax.dynamic_slice_in_dim(ordered, start, local),
            lax.dynamic_slice_in_dim(real, start, local))


def token_mean_nll(chosen_sums: Array, chosen_tokens: Array, axis_name: AxisName) -> Array:
    """The NLL per token over all chosen tokens of the global batch, from per-pair
    log-prob SUMS and token counts `[N]` (padding pairs already 0): global sums
    divided once, so it is the same however the pairs are split over devices."""
    total_logp = psum(jnp.sum(chosen_sums), axis_name)
    total_tokens = psum(jnp.sum(lax.stop_gradient(chosen_tokens)), axis_name)
    return -total_logp / jnp.maximum(total_tokens, 1.0)


# exp() arguments are clamped here (TRL's clamp for the alpha divergence in float32),
# so a very large log-ratio gives a large finite score, never inf - inf = NaN.
EXP_CLAMP = 80.0


def clamped_exp(x: Array) -> Array:
    # `where`, not `minimum`: its gradient selects instead of multiplying by 0, so an
    # infinite cotangent above the clamp (a squared score that overflowed) gives 0, not NaN
    return jnp.exp(jnp.where(x > EXP_CLAMP, EXP_CLAMP, x))
