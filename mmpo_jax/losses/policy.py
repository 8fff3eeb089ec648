"""Reference-free losses with an NLL term on the chosen answers: CPO (and AlphaPO) and ORPO.

Both as TRL 1.16's `trl.experimental.cpo` / `trl.experimental.orpo` compute them;
`docs/losses.md` gives the formulas. Inputs are `[N]`; `pair_mask` and `axis_name`
work as in `mmpo_jax.losses.mmpo_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmpo_jax.losses.reduce import (
    AxisName,
    Metrics,
    Reducer,
    clamped_exp,
    prepare,
    reward_metrics,
    stop_metrics,
    token_mean_nll,
)
from mmpo_jax.losses.declarations import CPO_LOSS_TYPES
from mmpo_jax.losses.dpo import conservative_sigmoid

Array = jax.Array
log_sigmoid = jax.nn.log_sigmoid


def _chosen_nll(red: Reducer, pc: Array, tokens: Array | None, averaged: bool) -> Array:
    """The token-mean NLL of the chosen answers, from sums or (with `averaged`) from
    per-token means times the token counts; `-mean_i pc_i` without counts."""
    if tokens is None:
        return -red.mean(pc)
    return token_mean_nll(pc * tokens if averaged else pc, tokens, red.axis_name)


def cpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    alphapo_alpha: float = 0.0,
    chosen_tokens: Array | None = None,
    averaged: bool = False,
    pair_mask: Array | None = None,
    axis_name: AxisName = None,
) -> tuple[Array, Metrics]:
    """CPO: a preference loss on the policy's log-probs alone plus `cpo_alpha` x the
    token-mean NLL of the chosen answers.

    The margin is `pc - pr`, or with AlphaPO (`alphapo_alpha` a != 0) the difference
    of `r = (1 - exp(-a logp)) / a`; then `sigmoid` / `simpo` (margin minus
    `gamma / beta`) take the conservative sigmoid with `label_smoothing`, `hinge`
    `relu(1 - beta m)`, `ipo` `(m - 1/(2 beta))^2`. `averaged`: the inputs are
    per-token means (TRL averages for ipo and simpo); `chosen_tokens` `[N]` turn them
    back into sums for the NLL.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; choose from {', '.join(CPO_LOSS_TYPES)}")
    arrays: tuple[Array, ...] = (policy_chosen_logps, policy_rejected_logps)
    if chosen_tokens is not None:
        arrays += (jax.lax.stop_gradient(jnp.asarray(chosen_tokens)),)
    cleaned, mask = prepare(arrays, pair_mask)
    pc, pr = cleaned[:2]
    red = Reducer(mask, axis_name)
    if alphapo_alpha != 0.0:
        a = alphapo_alpha
        r_c, r_r = (1.0 - clamped_exp(-a * pc)) / a, (1.0 - clamped_exp(-a * pr)) / a
    else:
        r_c, r_r = pc, pr
    margin = r_c - r_r
    b, e = beta, label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        per_pair = conservative_sigmoid(b * (margin - (gamma / b if loss_type == "simpo" else 0.0)), e)
    elif loss_type == "hinge":
        per_pair = jax.nn.relu(1.0 - b * margin)
    else:  # ipo
        per_pair = (margin - 1.0 / (2.0 * b)) ** 2
    preference = red.mean(per_pair)
    nll = _chosen_nll(red, pc, cleaned[2] if chosen_tokens is not None else None, averaged)
    loss = preference + cpo_alpha * nll
    metrics: Metrics = {
        "loss": loss,
        "logps/chosen": red.mean(pc),
        "logps/rejected": red.mean(pr),
        **reward_metrics(red, b * r_c, b * r_r),
        "nll_loss": nll,
    }
    return loss, stop_metrics(metrics, loss)


def _log1mexp(x: Array) -> Array:
    """`log(1 - exp(x))` for `x < 0`, without cancellation on either side of -log 2."""
    low = x < -jnp.log(2.0)
    # each branch on an input it is finite at: the branch `where` drops still has a
    # gradient, and inf * 0 there would be NaN
    x_low, x_high = jnp.where(low, x, -1.0), jnp.where(low, -1.0, x)
    return jnp.where(low, jnp.log1p(-jnp.exp(x_low)), jnp.log(-jnp.expm1(x_high)))


def orpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    *,
    beta: float,
    chosen_sequence_logps: Array,
    chosen_sequence_tokens: Array,
    pair_mask: Array | None = None,
    axis_name: AxisName = None,
) -> tuple[Array, Metrics]:
    """ORPO: `nll - beta * mean_i log_sigmoid(log_odds_i)`, with
    `log_odds = (pc - pr) - (log(1 - exp(pc)) - log(1 - exp(pr)))` on per-token-mean
    log-probs, and `nll` the token-mean NLL of the chosen SEQUENCES, prompt included
    (`chosen_sequence_logps` / `_tokens` `[N]`: the sum over every predicted token of
    the chosen row and their count), as TRL's ORPOTrainer computes it.
    """
    cleaned, mask = prepare(
        (policy_chosen_logps, policy_rejected_logps, chosen_sequence_logps,
         jax.lax.stop_gradient(jnp.asarray(chosen_sequence_tokens))),
        pair_mask,
    )
    pc, pr, seq_logps, seq_tokens = cleaned
    red = Reducer(mask, axis_name)
    # a per-token mean of exactly 0 (an empty answer, or probability 1) has infinite odds:
    # the largest value below 0 keeps them finite
    tiny = jnp.finfo(pc.dtype).tiny
    cap_c, cap_r = jnp.minimum(pc, -tiny), jnp.minimum(pr, -tiny)
    log_odds = (pc - pr) - (_log1mexp(cap_c) - _log1mexp(cap_r))
    ratio = log_sigmoid(log_odds)
    nll = token_mean_nll(seq_logps, seq_tokens, axis_name)
    loss = nll - beta * red.mean(ratio)
    metrics: Metrics = {
        "loss": loss,
        "logps/chosen": red.mean(pc),
        "logps/rejected": red.mean(pr),
        **reward_metrics(red, beta * pc, beta * pr),
        "nll_loss": nll,
        "log_odds_ratio": red.mean(ratio),
        "log_odds_chosen": red.mean(log_odds),
    }
    return loss, stop_metrics(metrics, loss)
