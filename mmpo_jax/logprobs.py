"""Per-token log-probs and entropies from final hidden states, without `[B, T, V]` logits.

The LM head and the log-softmax run in chunks of `chunk` sequence positions under a
`jax.custom_vjp`: the forward keeps only the log-normaliser (`[B, T]`) per position,
the backward recomputes each chunk's logits and turns them straight into the
gradients of the hidden states and of the head kernel. At any time one chunk's
`[B, chunk, V]` logits (and their gradient) exist, forward and backward. Logits and
the log-softmax are float32 whatever the dtype of the hidden states and kernel.
`soft_cap` c (Gemma 2's final-logit soft-cap): the logits are `c * tanh(z / c)` of
the head's output z, inside the chunks and their gradient.

The shift convention lives in one place, `model_token_logps`: the hidden state at
position t predicts token t+1, and the result is aligned with `input_ids`:
`logps[:, t] = log p(input_ids[:, t] | input_ids[:, :t])` for t >= 1, and
`logps[:, 0] = 0` (the first token is not predicted). A completion mask with the
same shape as `input_ids` (1 on the completion tokens) therefore applies directly:
`sequence_logps(logps, completion_mask, average)`.

The lower-level functions (`token_logps_chunked`, `token_logps_naive`) are unshifted:
`out[:, t] = log softmax(hidden[:, t] @ kernel)[targets[:, t]]`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from mmpo_jax.models.attention import Segments
    from mmpo_jax.models.decoder import Decoder

DEFAULT_CHUNK = 256


# --------------------------------------------------------------------------- #
# Naive reference: the full [B, T, V] logits (tests only)
# --------------------------------------------------------------------------- #
def soft_capped(logits: jax.Array, soft_cap: float | None) -> jax.Array:
    """`soft_cap * tanh(logits / soft_cap)` (float32), or the logits when it is None."""
    if soft_cap is None:
        return logits
    c = jnp.float32(soft_cap)
    return c * jnp.tanh(logits / c)


def token_logps_naive(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *, with_entropy: bool = False,
    with_log_sum_sq: bool = False, soft_cap: float | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """`log softmax(hidden @ kernel)[targets]` `[B, T]` (and the entropy `[B, T]` of
    each position's distribution, and `log sum_v p_v^2`), through the full float32
    logits. For tests."""
    logits = jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)
    logits = soft_capped(logits.astype(jnp.float32), soft_cap)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logps = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    extras = []
    if with_entropy:
        extras.append(-jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1))
    if with_log_sum_sq:
        extras.append(jax.lax.stop_gradient(jax.nn.logsumexp(2.0 * logp_all, axis=-1)))
    return (logps, *extras) if extras else logps


# --------------------------------------------------------------------------- #
# Chunked over the sequence with a custom VJP
# --------------------------------------------------------------------------- #
def token_logps_chunked(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    *,
    chunk: int = DEFAULT_CHUNK,
    with_entropy: bool = False,
    with_log_sum_sq: bool = False,
    soft_cap: float | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """Same values as `token_logps_naive` (and gradients w.r.t. `hidden` and `kernel`),
    `chunk` sequence positions at a time: no `[B, T, V]` array exists, forward or
    backward. A sequence length that `chunk` does not divide is padded internally.

    hidden `[B, T, D]`, kernel `[D, V]`, targets `[B, T]` int -> float32 `[B, T]`
    (then the float32 entropy `[B, T]` with `with_entropy`, and with `with_log_sum_sq`
    `log sum_v p_v^2` `[B, T]`, WPO's weight statistic: no gradient flows through it).
    """
    b, t, _ = hidden.shape
    chunk = max(1, min(int(chunk), t))
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    cap = None if soft_cap is None else float(soft_cap)
    logps, entropy, sum_sq = _chunked(hidden, kernel, targets.astype(jnp.int32), chunk, with_entropy,
                                      with_log_sum_sq, cap)
    extras = [entropy[:, :t]] if with_entropy else []
    if with_log_sum_sq:
        extras.append(jax.lax.stop_gradient(sum_sq[:, :t]))
    logps = logps[:, :t]
    return (logps, *extras) if extras else logps


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, n*C, ...] -> [n, B, C, ...]"""
    b, t = x.shape[:2]
    return jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)


def _from_chunks(x: jax.Array) -> jax.Array:
    """[n, B, C, ...] -> [B, n*C, ...]"""
    n, b, c = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _chunk_logits(h: jax.Array, kernel: jax.Array, soft_cap: float | None) -> jax.Array:
    logits = jnp.einsum("bcd,dv->bcv", h, kernel, preferred_element_type=jnp.float32)
    return soft_capped(logits.astype(jnp.float32), soft_cap)


def _forward_stats(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int, with_entropy: bool,
                   with_log_sum_sq: bool, soft_cap: float | None) -> tuple[jax.Array, ...]:
    """(logps, entropy, lse, log_sum_sq) `[B, T]` each, one chunk of logits at a time
    (entropy and log_sum_sq zeros unless asked for)."""

    def step(_: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, tuple[jax.Array, ...]]:
        h, tgt = xs
        logits = _chunk_logits(h, kernel, soft_cap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        logp_all = logits - lse[..., None]
        if with_entropy:
            # H = -sum_v p_v log p_v, on the normalised log-probs (no cancellation).
            entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        else:
            entropy = jnp.zeros_like(lse)
        sum_sq = jax.nn.logsumexp(2.0 * logp_all, axis=-1) if with_log_sum_sq else jnp.zeros_like(lse)
        return None, (tgt_logit - lse, entropy, lse, sum_sq)

    _, stats = jax.lax.scan(step, None, (_to_chunks(hidden, chunk), _to_chunks(targets, chunk)))
    return tuple(_from_chunks(x) for x in stats)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunked(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int, with_entropy: bool,
             with_log_sum_sq: bool, soft_cap: float | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    logps, entropy, _, sum_sq = _forward_stats(hidden, kernel, targets, chunk, with_entropy, with_log_sum_sq,
                                               soft_cap)
    return logps, entropy, sum_sq


def _chunked_fwd(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int, with_entropy: bool,
                 with_log_sum_sq: bool, soft_cap: float | None
                 ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]]:
    logps, entropy, lse, sum_sq = _forward_stats(hidden, kernel, targets, chunk, with_entropy, with_log_sum_sq,
                                                 soft_cap)
    return (logps, entropy, sum_sq), (hidden, kernel, targets, lse, entropy)


def _chunked_bwd(chunk: int, with_entropy: bool, with_log_sum_sq: bool, soft_cap: float | None,
                 res: tuple[jax.Array, ...], cotangents: tuple[jax.Array | None, ...]
                 ) -> tuple[jax.Array, jax.Array, None]:
    # log_sum_sq carries no gradient (token_logps_chunked stops it): its cotangent is 0
    hidden, kernel, targets, lse, entropy = res
    g_logp, g_ent, _ = cotangents
    g_logp = jnp.zeros_like(lse) if g_logp is None else g_logp.astype(jnp.float32)
    g_ent = jnp.zeros_like(lse) if g_ent is None else g_ent.astype(jnp.float32)
    d, v = kernel.shape

    def step(dk: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        h, tgt, lse_c, ent_c, gl, ge = xs
        logits = _chunk_logits(h, kernel, soft_cap)
        logp_all = logits - lse_c[..., None]
        p = jnp.exp(logp_all)
        # d logp[tgt] / dz = onehot(tgt) - p;  dH / dz = -p * (log p + H)
        if with_entropy:
            g_z = -p * (gl[..., None] + ge[..., None] * (logp_all + ent_c[..., None]))
        else:
            g_z = -p * gl[..., None]
        onehot = jax.nn.one_hot(tgt, v, dtype=jnp.float32) * gl[..., None]
        g_z = g_z + onehot
        if soft_cap is not None:  # d(c tanh(z / c)) / dz = 1 - tanh^2 = 1 - (capped / c)^2
            g_z = g_z * (1.0 - jnp.square(logits / jnp.float32(soft_cap)))
        g_h = jnp.einsum("bcv,dv->bcd", g_z.astype(kernel.dtype) if kernel.dtype != jnp.float32 else g_z,
                         kernel, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum(
            "bcd,bcv->dv",
            h,
            g_z.astype(h.dtype) if h.dtype != jnp.float32 else g_z,
            preferred_element_type=jnp.float32,
        )
        return dk, g_h.astype(hidden.dtype)

    xs = tuple(_to_chunks(x, chunk) for x in (hidden, targets, lse, entropy, g_logp, g_ent))
    dk, g_hidden = jax.lax.scan(step, jnp.zeros((d, v), jnp.float32), xs)
    return _from_chunks(g_hidden), dk.astype(kernel.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# --------------------------------------------------------------------------- #
# Sequences and the model
# --------------------------------------------------------------------------- #
def sequence_logps(token_logps: jax.Array, mask: jax.Array, average: bool) -> jax.Array:
    """`[B]`: the sum over positions with `mask` of `token_logps` `[B, T]`, or with
    `average` that sum divided by the number of masked positions (0 for an empty mask).
    Float32."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(token_logps.astype(jnp.float32) * mask, axis=-1)
    if not average:
        return total
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def shifted_token_logps(
    hidden: jax.Array,
    kernel: jax.Array,
    input_ids: jax.Array,
    *,
    chunk: int | None = DEFAULT_CHUNK,
    with_entropy: bool = False,
    with_log_sum_sq: bool = False,
    soft_cap: float | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """The shift, once: from the hidden states of `input_ids`, `logps[:, t] = log p(
    input_ids[:, t] | input_ids[:, :t])` for t >= 1 and 0 at t = 0 (aligned with
    `input_ids`). With `with_entropy`, `entropy[:, t]` is the entropy of the same
    distribution (the one that predicts token t; 0 at t = 0), and with
    `with_log_sum_sq` its `log sum_v p_v^2` (no gradient). `chunk=None`: the naive
    full-logits path (tests)."""
    # hidden[:, t] predicts input_ids[:, t + 1]; the last position predicts nothing.
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    if chunk is None:
        out = token_logps_naive(hidden, kernel, targets, with_entropy=with_entropy,
                                with_log_sum_sq=with_log_sum_sq, soft_cap=soft_cap)
    else:
        out = token_logps_chunked(hidden, kernel, targets, chunk=chunk, with_entropy=with_entropy,
                                  with_log_sum_sq=with_log_sum_sq, soft_cap=soft_cap)

    def align(x: jax.Array) -> jax.Array:  # value for predicting t+1 at position t -> position t+1
        return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)

    return tuple(align(x) for x in out) if isinstance(out, tuple) else align(out)


def model_token_logps(
    model: Decoder,
    input_ids: jax.Array,
    *,
    chunk: int | None = DEFAULT_CHUNK,
    with_entropy: bool = False,
    with_log_sum_sq: bool = False,
    dropout_key: jax.Array | None = None,
    positions: jax.Array | None = None,
    segments: Segments | None = None,
    sources: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """Per-token log-probs `[B, T]` of `input_ids` under `model` (a `Decoder`), aligned
    with `input_ids` (see the module docstring): `logps[:, t] = log p(input_ids[:, t]
    | input_ids[:, :t])`, `logps[:, 0] = 0`. Right-padded rows are fine: padding only
    comes after the real tokens and is masked by the caller's completion mask.

    `chunk`: sequence positions per chunk of the LM head (`model.logprob_chunk`);
    None = the naive full-logits path (tests). With `with_entropy`, also the entropy
    `[B, T]` of the distribution each token was drawn from; with `with_log_sum_sq`, then
    its `log sum_v p_v^2` `[B, T]` (WPO's weights; no gradient). Packed rows pass
    `positions` and `segments` (see `Decoder.__call__`) and `sources` `[B, T]`: the
    position whose hidden state predicts each token (the shift made explicit, so a
    shared prompt can predict both answers' first tokens); `logps[:, t] = log p(
    input_ids[:, t] | hidden[:, sources[:, t]])`, and the caller masks the tokens
    nothing predicts.
    """
    hidden = model(input_ids, dropout_key=dropout_key, positions=positions, segments=segments)
    if sources is not None:
        predictors = jnp.take_along_axis(hidden, sources[:, :, None], axis=1)
        head = token_logps_naive if chunk is None else partial(token_logps_chunked, chunk=chunk)
        return head(predictors, model.lm_head_kernel(), input_ids, with_entropy=with_entropy,
                    with_log_sum_sq=with_log_sum_sq, soft_cap=model.logit_soft_cap)
    return shifted_token_logps(
        hidden, model.lm_head_kernel(), input_ids, chunk=chunk, with_entropy=with_entropy,
        with_log_sum_sq=with_log_sum_sq, soft_cap=model.logit_soft_cap,
    )
