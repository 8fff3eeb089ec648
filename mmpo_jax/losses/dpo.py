"""DPO and TRL's DPO loss types (TRL 1.16 `DPOTrainer`), alone or as a weighted mixture.

    loss = sum_k w_k * mean_i loss_k(pair i)        (`loss.loss_type`, `loss.loss_weights`)

Every type reads the per-pair log-ratios `lr_c = pc - rc`, `lr_r = pr - rr`; the
ones TRL generalises to f-divergences read the scores `f(lr)` instead
(`loss.f_divergence_type`). `docs/losses.md` gives each formula and its source;
`mmpo_jax.losses.declarations` names the types. Inputs are `[N]`; `pair_mask` and
`axis_name` work as in `mmpo_jax.losses.mmpo_loss` (global means over the real
pairs, and `aot`'s sorts over the GLOBAL batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mmpo_jax.losses.reduce import (
    AxisName,
    Metrics,
    Reducer,
    clamped_exp,
    prepare,
    reward_metrics,
    sorted_real_first,
    stop_metrics,
    token_mean_nll,
)
from mmpo_jax.losses.declarations import PER_TOKEN_LOSS_TYPES, dpo_type_problem

Array = jax.Array
log_sigmoid = jax.nn.log_sigmoid


def f_scores(log_ratio: Array, divergence: str, alpha: float) -> Array:
    """`f'(pi/pi_ref)` of f-DPO as a function of `log_ratio` `[N]` (TRL's forms)."""
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return log_ratio
    if divergence == "forward_kl":  # f'(t) = 1 - 1/t
        return 1.0 - clamped_exp(-log_ratio)
    if divergence == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2.0) + log_sigmoid(log_ratio)
    if divergence == "alpha_divergence":  # f'(t) = (t^(alpha-1) - 1) / (alpha - 1)
        return (clamped_exp((alpha - 1.0) * log_ratio) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {divergence!r}")


def conservative_sigmoid(logits: Array, label_smoothing: float) -> Array:
    """`-(1 - e) log_sigmoid(x) - e log_sigmoid(-x)`: the sigmoid loss with labels
    flipped with probability `e` (cDPO)."""
    return -(1.0 - label_smoothing) * log_sigmoid(logits) - label_smoothing * log_sigmoid(-logits)


def loss_types_of(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None
                  ) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The mixture's `(types, weights)` (weights default to 1 each)."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    weights = (1.0,) * len(types) if not loss_weights else tuple(float(w) for w in loss_weights)
    return types, weights


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_tokens: Array | None = None,
    rejected_tokens: Array | None = None,
    pair_weights: Array | None = None,
    chosen_unweighted_logps: Array | None = None,
    pair_mask: Array | None = None,
    axis_name: AxisName = None,
) -> tuple[Array, Metrics]:
    """DPO with TRL's loss types; the default is the sigmoid loss of the DPO paper.

    `sigmoid` with `label_smoothing` e > 0 is conservative DPO,
    `-(1 - e) log_sigmoid(beta h) - e log_sigmoid(-beta h)` (TRL 1.16's sigmoid ignores e).

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
        `[N]` sequence log-probs (sums, or per-token means with `loss.average_logps`).
      beta: the KL weight (IPO's tau, SPPO's eta^-1: as TRL uses it for each type).
      loss_type, loss_weights: one type or a list, and their weights.
      chosen_tokens, rejected_tokens: `[N]` completion tokens, given with sequence sums:
        `ipo` and `sigmoid_norm` divide the scores by them, the `sft` type is the
        token-mean NLL over them (without them: the mean over pairs of `pc`).
      pair_weights: `[N]` WPO's weights (`loss.use_weighting`, no gradient): every
        component's per-pair loss is multiplied by them, the `sft` type by their mean.
      chosen_unweighted_logps: `[N]` the chosen answers' plain sums when the inputs are
        LD-DPO-weighted (`loss.ld_alpha`): the `sft` type's NLL reads them.
      pair_mask, axis_name: as in `mmpo_loss`.

    Returns:
      `(loss, metrics)`: TRL's DPO metrics, and `loss/<type>` (the unweighted mean of
      each component) for a mixture.
    """
    types, weights = loss_types_of(loss_type, loss_weights)
    problem = dpo_type_problem(types, loss_weights or None, f_divergence_type=f_divergence_type,
                               label_smoothing=label_smoothing, weighted=pair_weights is not None)
    if problem is not None:
        key, rule = problem
        raise ValueError(f"{key}: {rule}")
    per_token = [t for t in types if t in PER_TOKEN_LOSS_TYPES]
    if per_token and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"loss_type {per_token[0]} divides sequence sums by the answers' token counts: "
                         "give chosen_tokens and rejected_tokens")
    arrays: tuple[Array, ...] = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if chosen_tokens is not None and rejected_tokens is not None:
        arrays += (jax.lax.stop_gradient(jnp.asarray(chosen_tokens)),
                   jax.lax.stop_gradient(jnp.asarray(rejected_tokens)))
    n_tokens = len(arrays) - 4
    if pair_weights is not None:
        arrays += (jax.lax.stop_gradient(jnp.asarray(pair_weights)),)
    if chosen_unweighted_logps is not None:
        arrays += (chosen_unweighted_logps,)
    cleaned, mask = prepare(arrays, pair_mask)
    pc, pr, rc, rr = cleaned[:4]
    tokens = cleaned[4:6] if n_tokens == 2 else None
    rest = list(cleaned[4 + n_tokens:])
    wpo = rest.pop(0) if pair_weights is not None else None
    sft_chosen = rest.pop(0) if chosen_unweighted_logps is not None else pc
    red = Reducer(mask, axis_name)

    lr_c, lr_r = pc - rc, pr - rr
    s_c = f_scores(lr_c, f_divergence_type, f_alpha_divergence_coef)
    s_r = f_scores(lr_r, f_divergence_type, f_alpha_divergence_coef)
    b, e = beta, label_smoothing

    def component(kind: str) -> Array:
        if kind == "sft":
            nll = -red.mean(sft_chosen) if tokens is None else token_mean_nll(sft_chosen, tokens[0], axis_name)
            return nll if wpo is None else nll * red.mean(wpo)
        if kind in ("aot", "aot_unpaired"):
            # batch-level: the k-th smallest policy margin against the k-th smallest reference one
            first, second = (pc - pr, rc - rr) if kind == "aot" else (lr_c, lr_r)
            sorted_first, real = sorted_real_first(first, red)
            sorted_second, _ = sorted_real_first(second, red)
            return red.mean(conservative_sigmoid(b * (sorted_first - sorted_second), e), real)
        per_pair = _per_pair(kind, b, e, discopop_tau, lr_c, lr_r, s_c, s_r, tokens)
        return red.mean(per_pair if wpo is None else per_pair * wpo)

    parts = {kind: component(kind) for kind in types}
    loss = sum((w * parts[kind] for kind, w in zip(types, weights)), jnp.zeros((), pc.dtype))
    metrics: Metrics = {
        "loss": loss,
        "logps/chosen": red.mean(pc),
        "logps/rejected": red.mean(pr),
        **reward_metrics(red, b * lr_c, b * lr_r),
    }
    if len(types) > 1:
        metrics.update({f"loss/{kind}": value for kind, value in parts.items()})
    return loss, stop_metrics(metrics, loss)


def _per_pair(kind: str, b: float, e: float, tau: float, lr_c: Array, lr_r: Array, s_c: Array, s_r: Array,
              tokens: tuple[Array, ...] | None) -> Array:
    """The `[N]` per-pair loss of one pairwise loss type."""
    h = s_c - s_r
    if kind == "sigmoid":
        return conservative_sigmoid(b * h, e)
    if kind == "hinge":
        return jax.nn.relu(1.0 - b * h)
    if kind in ("ipo", "sigmoid_norm"):
        assert tokens is not None
        h_norm = s_c / jnp.maximum(tokens[0], 1.0) - s_r / jnp.maximum(tokens[1], 1.0)
        return (h_norm - 1.0 / (2.0 * b)) ** 2 if kind == "ipo" else -log_sigmoid(b * h_norm)
    if kind == "exo_pair":
        # KL(softmax of beta * h over {chosen, rejected} || [1 - e, e])
        return (jax.nn.sigmoid(b * h) * (log_sigmoid(b * h) - math.log1p(-e))
                + jax.nn.sigmoid(-b * h) * (log_sigmoid(-b * h) - math.log(e)))
    if kind == "nca_pair":
        return -log_sigmoid(b * lr_c) - 0.5 * log_sigmoid(-b * lr_c) - 0.5 * log_sigmoid(-b * lr_r)
    if kind == "robust":
        return (-(1.0 - e) * log_sigmoid(b * h) + e * log_sigmoid(-b * h)) / (1.0 - 2.0 * e)
    if kind == "bco_pair":
        return -log_sigmoid(b * lr_c) - log_sigmoid(-b * lr_r)
    if kind == "sppo_hard":
        return (lr_c - 0.5 / b) ** 2 + (lr_r + 0.5 / b) ** 2
    if kind == "apo_zero":
        return 1.0 - jax.nn.sigmoid(b * lr_c) + jax.nn.sigmoid(b * lr_r)
    if kind == "apo_down":
        return jax.nn.sigmoid(b * lr_c) + 1.0 - jax.nn.sigmoid(b * (lr_c - lr_r))
    if kind == "discopop":
        x = b * h
        gate = jax.nn.sigmoid(x / tau)
        # gate * exp(-x) in log space: exp(-x) alone overflows where the gate is 0
        return -log_sigmoid(x) * (1.0 - gate) + clamped_exp(-x + log_sigmoid(x / tau))
    raise ValueError(f"unknown DPO loss_type {kind!r}")
