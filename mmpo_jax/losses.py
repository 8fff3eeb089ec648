"""Preference losses on per-pair sequence log-probs: MMPO, DPO, SimPO, and SFT.

The contract is `docs/losses.md`; `mmpo_jax.loss_registry` declares each loss (what it
reads, its defaults, its metrics). Every function here is pure: it takes
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

from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
from jax import lax

from mmpo_jax import loss_registry
from mmpo_jax.loss_inputs import LossInputs

if TYPE_CHECKING:
    from mmpo_jax.config_schema import LossConfig

Array = jax.Array
AxisName = str | tuple[str, ...] | None
Metrics = dict[str, Array]



# --------------------------------------------------------------------------- #
# Reductions that are global when an axis name is given
# --------------------------------------------------------------------------- #
def _psum(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def _pmin(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else lax.pmin(x, axis_name)


def _pmax(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else lax.pmax(x, axis_name)


class _Reducer:
    """Means over the real pairs of the global batch.

    Sums and counts are reduced separately and divided once, so the mean is
    exact however the pairs are split over devices.
    """

    def __init__(self, mask: Array, axis_name: AxisName):
        self.mask = mask  # [N] float, 0 or 1
        self.axis_name = axis_name
        self.count = _psum(jnp.sum(mask), axis_name)  # scalar, global

    def mean(self, x: Array) -> Array:
        """Mean of `x` `[N]` over the global real pairs (0 when there are none)."""
        total = _psum(jnp.sum(jnp.where(self.mask > 0, x, 0.0)), self.axis_name)
        return total / jnp.maximum(self.count, 1.0)

    # Extremes carry no gradient (lax.pmin/pmax have no differentiation rule,
    # and the contract stops the gradient of the normalisation statistics).
    def min(self, x: Array) -> Array:
        local = jnp.min(jnp.where(self.mask > 0, lax.stop_gradient(x), jnp.inf))
        return _pmin(local, self.axis_name)

    def max(self, x: Array) -> Array:
        local = jnp.max(jnp.where(self.mask > 0, lax.stop_gradient(x), -jnp.inf))
        return _pmax(local, self.axis_name)


def _loss_dtype(*xs: Array) -> jnp.dtype:
    """At least float32: bfloat16/float16 inputs are upcast, float64 stays."""
    return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def _prepare(
    arrays: tuple[Array, ...], pair_mask: Array | None
) -> tuple[tuple[Array, ...], Array]:
    """Upcasts the `[N]` inputs and zeroes the padding pairs.

    Returns the cleaned arrays and the mask as a float array `[N]`.
    """
    dtype = _loss_dtype(*arrays)
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


def _implicit_reward_metrics(
    red: _Reducer, chosen_rewards: Array, rejected_rewards: Array
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
    cleaned, mask = _prepare(inputs, pair_mask)
    pc, pr, rc, rr = cleaned[:4]
    red = _Reducer(mask, axis_name)

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
        **_implicit_reward_metrics(red, beta * (pc - rc), beta * (pr - rr)),
        "mmpo/score_chosen": red.mean(s_w),
        "mmpo/score_rejected": red.mean(s_l),
        "mmpo/score_accuracy": red.mean((s_w > s_l).astype(s_w.dtype)),
        "mmpo/reward_range": reward_range,
    }
    if entropy is not None:
        metrics["entropy"] = red.mean(cleaned[4])
    return loss, _stop_metrics(metrics, loss)


# --------------------------------------------------------------------------- #
# DPO
# --------------------------------------------------------------------------- #
def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    pair_mask: Array | None = None,
    axis_name: AxisName = None,
) -> tuple[Array, Metrics]:
    """DPO (sigmoid loss, optional conservative label smoothing).

    `h = (pc - rc) - (pr - rr)`,
    `loss_i = -(1 - e) log_sigmoid(beta h) - e log_sigmoid(-beta h)`.
    Inputs are `[N]`; see `mmpo_loss` for `pair_mask` and `axis_name`.
    """
    (pc, pr, rc, rr), mask = _prepare(
        (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps),
        pair_mask,
    )
    red = _Reducer(mask, axis_name)
    logits = beta * ((pc - rc) - (pr - rr))
    per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(
        logits
    ) - label_smoothing * jax.nn.log_sigmoid(-logits)
    loss = red.mean(per_pair)
    metrics: Metrics = {
        "loss": loss,
        "logps/chosen": red.mean(pc),
        "logps/rejected": red.mean(pr),
        **_implicit_reward_metrics(red, beta * (pc - rc), beta * (pr - rr)),
    }
    return loss, _stop_metrics(metrics, loss)


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
    (pc, pr), mask = _prepare((policy_chosen_logps, policy_rejected_logps), pair_mask)
    red = _Reducer(mask, axis_name)
    per_pair = -jax.nn.log_sigmoid(beta * (pc - pr) - gamma)
    loss = red.mean(per_pair)
    metrics: Metrics = {
        "loss": loss,
        "logps/chosen": red.mean(pc),
        "logps/rejected": red.mean(pr),
        **_implicit_reward_metrics(red, beta * pc, beta * pr),
    }
    return loss, _stop_metrics(metrics, loss)


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
    cleaned, mask = _prepare(inputs, pair_mask)
    pc, pr = cleaned[:2]
    red = _Reducer(mask, axis_name)
    if chosen_tokens is None:
        loss = -red.mean(pc)
    else:
        # global sums divided once, so the result is the token mean of the whole
        # batch however its pairs are split over devices
        total_logp = _psum(jnp.sum(pc), axis_name)  # padding pairs are already 0
        total_tokens = _psum(jnp.sum(cleaned[-1]), axis_name)
        loss = -total_logp / jnp.maximum(total_tokens, 1.0)
    metrics: Metrics = {
        "loss": loss,
        "logps/chosen": red.mean(pc),
        "logps/rejected": red.mean(pr),
    }
    if with_ref:
        rc, rr = cleaned[2:4]
        metrics.update(_implicit_reward_metrics(red, beta * (pc - rc), beta * (pr - rr)))
    return loss, _stop_metrics(metrics, loss)


def _stop_metrics(metrics: Metrics, loss: Array) -> Metrics:
    """Metrics are reported values, never differentiated (the loss excepted)."""
    return {k: (loss if k == "loss" else lax.stop_gradient(v)) for k, v in metrics.items()}


def configured_loss(
    loss_cfg: LossConfig,
    inputs: LossInputs,
    *,
    axis_name: AxisName = None,
    name: str | None = None,
    beta: float | None = None,
) -> tuple[Array, Metrics]:
    """The loss the `loss` config section names (or `name`, `beta`) on `inputs` `[pairs]`.

    What each loss reads from `inputs` and the config is its declaration in
    `mmpo_jax.loss_registry` (`call_arguments`, shared with the PyTorch reference).
    """
    spec, args, kwargs = loss_registry.call_arguments(loss_cfg, inputs, name=name, beta=beta)
    fn = globals()[spec.function]
    return fn(*args, axis_name=axis_name, **kwargs)
