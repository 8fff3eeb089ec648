"""Per-pair sequence log-probs (and entropy bonuses) of a pair-major batch.

The batch is pair-major, `input_ids [pairs, 2, seq]` (chosen at index 0, rejected
at 1), with `loss_mask [pairs, 2, seq]` aligned with `input_ids` (1 on the
completion tokens whose log-prob counts). Chosen and rejected run through the
model in ONE forward of `2 * pairs` rows, so a pair never straddles devices
when the pairs axis is split over the batch mesh axes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import jax
import jax.numpy as jnp

from mmpo_jax.logprobs import model_token_logps, sequence_logps

if TYPE_CHECKING:
    from mmpo_jax.models.llama import Llama


class PairLogps(NamedTuple):
    logps: jax.Array  # [pairs, 2] float32
    entropy: jax.Array | None  # [pairs]
    # the chosen rows' (log-prob sum, token count) `[pairs]` each over every predicted token
    chosen_sequence: tuple[jax.Array, jax.Array] | None


def sequence_mask(loss_mask: jax.Array) -> jax.Array:
    """`[..., seq]` 1 on every predicted token of a right-padded row up to its last
    completion token (the prompt included, the first token and the padding not), from
    the completion mask: the completion is the row's tail."""
    mask = loss_mask.astype(jnp.float32)
    upto_last = jnp.flip(jnp.cumsum(jnp.flip(mask, -1), -1), -1) > 0
    predicted = jnp.arange(mask.shape[-1]) >= 1
    return (upto_last & predicted).astype(jnp.float32)


def pair_logps(
    model: Llama,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    average: bool,
    chunk: int | None,
    entropy_estimator: Literal["token", "score_function"] | None = None,
    dropout_key: jax.Array | None = None,
    chosen_sequence: bool = False,
) -> PairLogps:
    """Sequence log-probs `[pairs, 2]` (float32) and, with an estimator, the per-pair
    entropy bonus `E_i` `[pairs]` of the contract (the mean over the two completions);
    with `chosen_sequence`, the chosen rows' log-prob sums and token counts over
    `sequence_mask` (ORPO's NLL covers the prompt).

    - `token`: `sum_t m_t H_t` (divided by `sum_t m_t` when `average`).
    - `score_function`: `sum_t m_t (H_t + stop_grad(H_t) * P_t)`, `P_t` the log-prob
      of the completion prefix up to and including token t; its value is not the
      entropy, its gradient adds the score-function part of the sequence entropy's.
    """
    pairs, two, seq = input_ids.shape
    ids = input_ids.reshape(pairs * two, seq)
    mask = loss_mask.reshape(pairs * two, seq).astype(jnp.float32)
    out = model_token_logps(
        model, ids, chunk=chunk, with_entropy=entropy_estimator is not None, dropout_key=dropout_key
    )
    if not isinstance(out, tuple):
        token_logps, entropy = out, None
    else:
        assert entropy_estimator is not None
        token_logps, token_entropy = out
        entropy = _entropy_bonus(token_logps, token_entropy, mask, entropy_estimator, average)
        entropy = entropy.reshape(pairs, two).mean(axis=1)
    seq_logps = sequence_logps(token_logps, mask, average).reshape(pairs, two)
    whole = None
    if chosen_sequence:
        chosen_mask = sequence_mask(loss_mask[:, 0])
        chosen_logps = token_logps.reshape(pairs, two, seq)[:, 0].astype(jnp.float32)
        whole = (jnp.sum(chosen_logps * chosen_mask, axis=-1), jnp.sum(chosen_mask, axis=-1))
    return PairLogps(seq_logps, entropy, whole)


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
