"""Preference losses on per-pair sequence log-probs: MMPO, SimPO and SFT here; DPO with
TRL's loss types (`mmpo_jax.losses.dpo`), CPO and ORPO (`mmpo_jax.losses.policy`)
imported, so every loss is `mmpo_jax.losses.mmpo.<name>_loss`.

The contract is `docs/losses.md`; `mmpo_jax.losses.declarations` declares each loss (what
it reads, its defaults, its metrics), `mmpo_jax.losses.registry` binds it to its function. Every function here is pure: it takes
`[N]` arrays of sequence log-probs (one entry per preference pair) and returns
`(loss, metrics)`, `metrics` a dict of scalar arrays with TRL's names.

Global statistics. With `axis_name` (a mesh axis name or a tuple of them) the
function is meant to run inside `jax.shard_map` with the pairs split over those
axes: MMPO's min/max come from `lax.pmin`/`lax.pmax`, and every mean is a
`lax.psum` of local sums over a `lax.psum` of local real-pair counts, so the
result equals the single-device computation on the whole batch.

Padding pairs. `pair_mask` `[N]` (1 = real pair, 0 = padding) removes pairs
from every statistic. Masked entries are replaced by zeros before any
arithmetic, so whatever they hold (even NaN) never reaches the loss or the
gradient.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from mmpo_jax.losses.reduce import AxisName, Metrics, Reducer, prepare, reward_metrics, stop_metrics, token_mean_nll
from mmpo_jax.losses.dpo import dpo_loss
from mmpo_jax.losses.policy import cpo_loss, orpo_loss

Array = jax.Array

__all__ = ["cpo_loss", "dpo_loss", "mmpo_loss", "orpo_loss", "sft_loss", "simpo_loss"]



# --------------------------------------------------------------------------- #
# MMPO
# --------------------------------------------------------------------------- #
def mmpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float,
    reward_epsilon: float = 1.0,
    rejected_epsilon: float = 0.1,
    norm_eps: float = 1e-6,
    aux_weight: float = 1.0,
    normalize: Literal["minmax", "none"] = "minmax",
    entropy: Array | None = None,
    entropy_weight: float = 0.0,
    pair_mask: Array | None = None,
    axis_name: AxisName = None,
) -> tuple[Array, Metrics]:
    """Maximum marginal likelihood preference loss (the paper's MMPO).

    Args:
      policy_chosen_logps, policy_rejected_logps: `[N]` policy sequence log-probs.
      ref_chosen_logps, ref_rejected_logps: `[N]` reference sequence log-probs.
      beta: reward scale on the reference log-probs.
      reward_epsilon, rejected_epsilon: reward offsets of chosen and rejected.
      norm_eps: keeps the min-max normalisation finite when all rewards are equal.
      aux_weight: weight of the auxiliary `-log_sigmoid(s_w - s_l)` term. With 1
        (the paper's default) the loss is `-s_w` per pair: its gradient is
        supervised fine-tuning on the chosen completions (see the contract).
      normalize: "minmax" over the global batch, or "none" (n = r).
      entropy: `[N]` per-pair entropy bonus `E_i`, needed when
        `entropy_weight > 0`.
      entropy_weight: weight of `-E_i` in the loss.
      pair_mask: `[N]`, 1 for real pairs, 0 for padding.
      axis_name: mesh axes the pairs are split over (inside `shard_map`).

    Returns:
      `(loss, metrics)`: the scalar mean loss over the global real pairs and the
      contract's metrics.
    """
    if normalize not in ("minmax", "none"):
        raise ValueError(f"normalize must be 'minmax' or 'none', got {normalize!r}")
    if entropy_weight != 0.0 and entropy is None:
        raise ValueError(
            "entropy_weight is non-zero but no per-pair `entropy` was given"
        )
    inputs: tuple[Array, ...] = (
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    if entropy is not None:
        inputs = inputs + (entropy,)
    cleaned, mask = prepare(inputs, pair_mask)
    pc, pr, rc, rr = cleaned[:4]
    red = Reducer(mask, axis_name)

    r_w = reward_epsilon + beta * rc
    r_l = rejected_epsilon + beta * rr
    if normalize == "minmax":
        # The statistics depend on the reference only and carry no gradient
        # (the reducer stops it), so the subgradient of min/max never enters.
        lo = red.min(jnp.minimum(r_w, r_l))
        hi = red.max(jnp.maximum(r_w, r_l))
        # No real pair anywhere: lo=+inf, hi=-inf. Any finite value works then.
        any_real = red.count > 0
        lo = jnp.where(any_real, lo, 0.0)
        hi = jnp.where(any_real, hi, 0.0)
        # The contract's (r + eps - lo) / (hi - lo + eps), with the subtraction
        # first: r - lo is exact for nearby values, so when all rewards are equal
        # n is exactly 1 instead of eps-relative rounding noise.
        denom = (hi - lo) + norm_eps
        n_w = ((r_w - lo) + norm_eps) / denom
        n_l = ((r_l - lo) + norm_eps) / denom
        reward_range = hi - lo
    else:
        n_w, n_l = r_w, r_l
        reward_range = red.max(jnp.maximum(r_w, r_l)) - red.min(jnp.minimum(r_w, r_l))
        reward_range = jnp.where(red.count > 0, reward_range, 0.0)

    s_w = pc + n_w
    s_l = pr + n_l
    per_pair = -jnp.logaddexp(s_w, s_l) - aux_weight * jax.nn.log_sigmoid(s_w - s_l)
    if entropy is not None and entropy_weight != 0.0:
        per_pair = per_pair - entropy_weight * cleaned[4]
    loss = red.mean(per_pair)

    metrics: Metrics = {
        "loss": loss,
        "logps/chosen": red.mean(pc),
        "logps/rejected": red.mean(pr),
        **reward_metrics(red, beta * (pc - rc), beta * (pr - rr)),
        "mmpo/score_chosen": red.mean(s_w),
        "mmpo/score_rejected": red.mean(s_l),
        "mmpo/score_accuracy": red.mean((s_w > s_l).astype(s_w.dtype)),
        "mmpo/reward_range": reward_range,
    }
    if entropy is not None:
        metrics["entropy"] = red.mean(cleaned[4])
    return loss, stop_metrics(metrics, loss)


# --------------------------------------------------------------------------- #
# SimPO
# --------------------------------------------------------------------------- #
def simpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    *,
    beta: float,
    gamma: float,
    pair_mask: Array | None = None,
    axis_name: AxisName = None,
) -> tuple[Array, Metrics]:
    """SimPO, reference-free: `loss_i = -log_sigmoid(beta (pc - pr) - gamma)`.

    The inputs are expected to be length-averaged sequence log-probs `[N]`;
    `gamma` is the target margin in reward units (TRL's `simpo_gamma`).
    """
    (pc, pr), mask = prepare((policy_chosen_logps, policy_rejected_logps), pair_mask)
    red = Reducer(mask, axis_name)
    per_pair = -jax.nn.log_sigmoid(beta * (pc - pr) - gamma)
    loss = red.mean(per_pair)
    metrics: Metrics = {
        "loss": loss,
        "logps/chosen": red.mean(pc),
        "logps/rejected": red.mean(pr),
        **reward_metrics(red, beta * pc, beta * pr),
    }
    return loss, stop_metrics(metrics, loss)


# --------------------------------------------------------------------------- #
# SFT on the chosen answers
# --------------------------------------------------------------------------- #
def sft_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    chosen_tokens: Array | None = None,
    beta: float = 0.1,
    pair_mask: Array | None = None,
    axis_name: AxisName = None,
) -> tuple[Array, Metrics]:
    """Supervised fine-tuning: the negative log-likelihood of the chosen answers.

    The rejected answers take no part in the loss; their log-probs are only
    reported (`logps/rejected`), like every loss reports them.

    Normalisation, by what the caller has:
    - `chosen_tokens` `[N]` given (the train step's default, `average_logps: false`):
      `policy_chosen_logps` are sequence SUMS and the loss is the token-mean NLL
      over every chosen completion token of the global batch,
      `-sum_i pc_i / sum_i T_i`, as TRL's SFTTrainer (mean cross-entropy over the
      unmasked label tokens). Long answers weigh more, per token.
    - `chosen_tokens` None: the mean over the global real pairs of whatever
      `policy_chosen_logps` holds, `-mean_i pc_i`: the mean of per-sequence token
      averages with `average_logps: true`, of sequence sums otherwise. With sums
      this is exactly the loss whose gradient MMPO with `aux_weight = 1` has
      (`-1/N` on every `pc`, 0 on every `pr`; see the contract's identity); the
      token mean differs from it by the factor `sum_i T_i / N` in the gradient.

    Args:
      policy_chosen_logps, policy_rejected_logps: `[N]` policy sequence log-probs.
      ref_chosen_logps, ref_rejected_logps: optional `[N]` reference log-probs. SFT
        needs none; given (a run with `model.reference` set), they only add the
        contract's DPO-style `rewards/*` metrics (with `beta`), for comparing runs.
      chosen_tokens: `[N]` completion tokens of each chosen answer (data, no
        gradient), or None (see above).
      beta: the scale of the `rewards/*` metrics; not part of the loss.
      pair_mask, axis_name: as in `mmpo_loss`.

    Returns:
      `(loss, metrics)`: `loss`, `logps/chosen`, `logps/rejected` (means over the
      global real pairs of the inputs as given), and `rewards/*` with a reference.
    """
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("sft_loss: give both reference log-probs (chosen and rejected) or neither")
    with_ref = ref_chosen_logps is not None
    inputs: tuple[Array, ...] = (policy_chosen_logps, policy_rejected_logps)
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        inputs = inputs + (ref_chosen_logps, ref_rejected_logps)
    if chosen_tokens is not None:
        # token counts are data: never differentiated
        inputs = inputs + (lax.stop_gradient(jnp.asarray(chosen_tokens)),)
    cleaned, mask = prepare(inputs, pair_mask)
    pc, pr = cleaned[:2]
    red = Reducer(mask, axis_name)
    loss = -red.mean(pc) if chosen_tokens is None else token_mean_nll(pc, cleaned[-1], axis_name)
    metrics: Metrics = {
        "loss": loss,
        "logps/chosen": red.mean(pc),
        "logps/rejected": red.mean(pr),
    }
    if with_ref:
        rc, rr = cleaned[2:4]
        metrics.update(reward_metrics(red, beta * (pc - rc), beta * (pr - rr)))
    return loss, stop_metrics(metrics, loss)
