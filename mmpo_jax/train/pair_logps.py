"""Per-pair sequence log-probs (and entropy bonuses) of a pair-major batch.

The batch is pair-major, `input_ids [pairs, 2, seq]` (chosen at index 0, rejected
at 1), with `loss_mask [pairs, 2, seq]` aligned with `input_ids` (1 on the
completion tokens whose log-prob counts). Chosen and rejected run through the
model in ONE forward of `2 * pairs` rows, so a pair never straddles devices
when the pairs axis is split over the batch mesh axes.

A batch of a packed layout (`mmpo_jax.data.layout`: `Layout.segments`, packed or
shared-prompt rows) runs its rows `[rows, pack]` through the model instead, in the
layout's attention segments, each token predicted from its `sources` position, and
`token_outputs` gathers each token's values back into the pair-major layout by
`token_index`, so every reduction below reads the same `[pairs * 2, seq]` arrays for
every layout.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Literal, NamedTuple

import jax
import jax.numpy as jnp

from mmpo_jax.logprobs import model_token_logps, sequence_logps

if TYPE_CHECKING:
    from mmpo_jax.data.layout import DeviceBatch
    from mmpo_jax.models.decoder import Decoder


class PairLogps(NamedTuple):
    logps: jax.Array  # [pairs, 2] float32
    entropy: jax.Array | None  # [pairs]
    # the chosen rows' (log-prob sum, token count) `[pairs]` each over every predicted token
    chosen_sequence: tuple[jax.Array, jax.Array] | None = None
    # WPO's per-pair weights `[pairs]` (no gradient)
    weights: jax.Array | None = None
    # with LD-DPO: the chosen answers' plain (unweighted) log-prob sums `[pairs]`
    chosen_unweighted: jax.Array | None = None


def length_desensitised_mask(loss_mask: jax.Array, ld_alpha: float) -> jax.Array:
    """LD-DPO's per-token weights `[pairs, 2, seq]`: 1 on the first `min(T_w, T_l)`
    completion tokens of both answers (their shared length), `ld_alpha` on the longer
    answer's tail, 0 off the completion (TRL 1.16's `ld_alpha`)."""
    mask = loss_mask.astype(jnp.float32)
    position = jnp.cumsum(mask, axis=-1)  # 1, 2, ... along each completion
    shared = jnp.min(jnp.sum(mask, axis=-1), axis=1)[:, None, None]  # [pairs, 1, 1]
    return mask * jnp.where(position <= shared, 1.0, ld_alpha)


def wpo_weights(token_logps: jax.Array, log_sum_sq: jax.Array, mask: jax.Array) -> jax.Array:
    """WPO's weight of each row `[rows]`, without gradient: `exp(mean_t (logp_t - log
    sum_v p_v^2))` over its completion tokens (arXiv 2406.11827, Eq. 2 as TRL 1.16)."""
    aligned = jax.lax.stop_gradient(token_logps.astype(jnp.float32) - log_sum_sq) * mask
    return jnp.exp(jnp.sum(aligned, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0))


def sequence_mask(loss_mask: jax.Array) -> jax.Array:
    """`[..., seq]` 1 on every predicted token of a right-padded row up to its last
    completion token (the prompt included, the first token and the padding not), from
    the completion mask: the completion is the row's tail."""
    mask = loss_mask.astype(jnp.float32)
    upto_last = jnp.flip(jnp.cumsum(jnp.flip(mask, -1), -1), -1) > 0
    predicted = jnp.arange(mask.shape[-1]) >= 1
    return (upto_last & predicted).astype(jnp.float32)


def token_outputs(model: Decoder, batch: DeviceBatch, *, chunk: int | None, with_entropy: bool,
                  with_log_sum_sq: bool, dropout_key: jax.Array | None) -> list[jax.Array]:
    """Per-token log-probs (then entropies, then `log sum_v p_v^2`, as asked) `[pairs * 2,
    seq]` aligned with the pair-major `loss_mask`, for a pair-major or a packed batch."""
    run = partial(model_token_logps, model, chunk=chunk, with_entropy=with_entropy,
                  with_log_sum_sq=with_log_sum_sq, dropout_key=dropout_key)
    if not batch.layout.segments:
        ids = batch.input_ids
        out = run(ids.reshape(-1, ids.shape[-1]))
        return list(out) if isinstance(out, tuple) else [out]
    index, attended = batch.token_index, batch.attention_mask  # [pairs, 2, seq]
    assert index is not None and attended is not None, f"a {batch.layout.name} batch maps its rows to pairs"
    out = run(batch.input_ids, positions=batch.positions, segments=batch.layout.attention_segments(batch),
              sources=batch.sources)
    # token_index: into the rows, flattened; off a sequence (and at its first token, which
    # nothing predicts) the pair-major values are 0, as the unpacked layout's
    predicted = (attended > 0) & (jnp.arange(index.shape[-1]) >= 1)
    flat = index.reshape(-1, index.shape[-1])
    keep = predicted.reshape(flat.shape)
    return [jnp.where(keep, jnp.take(x.reshape(-1), flat, axis=0), 0.0).astype(x.dtype)
            for x in (out if isinstance(out, tuple) else (out,))]


def pair_logps(
    model: Decoder,
    batch: DeviceBatch,
    *,
    average: bool,
    chunk: int | None,
    entropy_estimator: Literal["token", "score_function"] | None = None,
    dropout_key: jax.Array | None = None,
    chosen_sequence: bool = False,
    ld_alpha: float | None = None,
    weighting: bool = False,
) -> PairLogps:
    """Sequence log-probs `[pairs, 2]` (float32) of `batch` (its `loss_mask` `[pairs, 2,
    seq]`, pair-major or packed: see the module docstring) and, with an estimator, the per-pair
    entropy bonus `E_i` `[pairs]` of the contract (the mean over the two completions);
    with `chosen_sequence`, the chosen rows' log-prob sums and token counts over
    `sequence_mask` (ORPO's NLL covers the prompt). With `ld_alpha`, the sequence
    log-probs weigh each token by `length_desensitised_mask` (and `chosen_unweighted`
    keeps the chosen answers' plain sums); with `weighting`, WPO's
    per-pair weights `w_chosen * w_rejected` (`wpo_weights`, on the unweighted tokens).

    - `token`: `sum_t m_t H_t` (divided by `sum_t m_t` when `average`).
    - `score_function`: `sum_t m_t (H_t + stop_grad(H_t) * P_t)`, `P_t` the log-prob
      of the completion prefix up to and including token t; its value is not the
      entropy, its gradient adds the score-function part of the sequence entropy's.
    """
    loss_mask = batch.loss_mask
    pairs, two, seq = loss_mask.shape
    mask = loss_mask.reshape(pairs * two, seq).astype(jnp.float32)
    parts = token_outputs(model, batch, chunk=chunk, with_entropy=entropy_estimator is not None,
                          with_log_sum_sq=weighting, dropout_key=dropout_key)
    token_logps = parts.pop(0)
    entropy = None
    if entropy_estimator is not None:
        entropy = _entropy_bonus(token_logps, parts.pop(0), mask, entropy_estimator, average)
        entropy = entropy.reshape(pairs, two).mean(axis=1)
    weights = None
    if weighting:
        weights = wpo_weights(token_logps, parts.pop(0), mask).reshape(pairs, two).prod(axis=1)
    unweighted = None
    if ld_alpha is not None:
        assert not average, "LD-DPO weighs sequence sums (the config refuses average_logps with it)"
        weighted = length_desensitised_mask(loss_mask, ld_alpha).reshape(pairs * two, seq)
        seq_logps = sequence_logps(token_logps, weighted, False).reshape(pairs, two)
        # the sft type's NLL reads the plain log-probs (TRL's per_token_logps)
        unweighted = sequence_logps(token_logps, mask, False).reshape(pairs, two)[:, 0]
    else:
        seq_logps = sequence_logps(token_logps, mask, average).reshape(pairs, two)
    whole = None
    if chosen_sequence:
        chosen_mask = sequence_mask(loss_mask[:, 0])
        chosen_logps = token_logps.reshape(pairs, two, seq)[:, 0].astype(jnp.float32)
        whole = (jnp.sum(chosen_logps * chosen_mask, axis=-1), jnp.sum(chosen_mask, axis=-1))
    return PairLogps(seq_logps, entropy, whole, weights, unweighted)


def _entropy_bonus(
    token_logps: jax.Array, token_entropy: jax.Array, mask: jax.Array, estimator: str, average: bool
) -> jax.Array:
    """`[rows]` entropy bonus from per-token log-probs and entropies `[rows, seq]`."""
    h = token_entropy.astype(jnp.float32) * mask
    if estimator == "score_function":
        prefix = jnp.cumsum(token_logps.astype(jnp.float32) * mask, axis=-1)
        h = h + jax.lax.stop_gradient(h) * prefix * mask
    total = jnp.sum(h, axis=-1)
    if average:
        total = total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return total
