"""The preference losses (and SFT) in PyTorch, written from the contract (`docs/losses.md`).

This is the reference the JAX code is checked against. It is written from the
specification, not translated from `mmpo_jax.losses`: the arithmetic is spelled
out the way the contract states it (stacked scores and `torch.logsumexp`,
explicit global gathers through `torch.distributed.all_reduce`).

Arguments match `mmpo_jax.losses` on `torch.Tensor`s, with `group` in place of
`axis_name`: `None` means this process only; a `torch.distributed` process group
(e.g. `torch.distributed.group.WORLD`) makes min, max, sums and counts global
over that group. Metrics are 0-d tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mmpo_jax.torch_ref.pairs import Tensor, _Batch, _reward_metrics, _token_mean_nll
from mmpo_jax.torch_ref.trl_losses import cpo_loss, dpo_loss, orpo_loss

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["cpo_loss", "dpo_loss", "mmpo_loss", "orpo_loss", "sft_loss", "simpo_loss"]


def mmpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    reward_epsilon: float = 1.0,
    rejected_epsilon: float = 0.1,
    norm_eps: float = 1e-6,
    aux_weight: float = 1.0,
    normalize: str = "minmax",
    entropy: Tensor | None = None,
    entropy_weight: float = 0.0,
    pair_mask: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, dict]:
    """MMPO as the contract states it; returns (loss, metrics)."""
    if normalize not in ("minmax", "none"):
        raise ValueError(f"normalize must be 'minmax' or 'none', got {normalize!r}")
    if entropy_weight != 0.0 and entropy is None:
        raise ValueError("entropy_weight is non-zero but no per-pair `entropy` was given")
    tensors = [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps]
    if entropy is not None:
        tensors.append(entropy)
    b = _Batch(tensors, pair_mask, group)
    pc, pr, rc, rr = b.tensors[:4]

    rewards = torch.stack([reward_epsilon + beta * rc, rejected_epsilon + beta * rr], dim=1)  # [N, 2]
    if b.n_real > 0:
        lo = b.extreme(rewards.min(dim=1).values, largest=False).detach()
        hi = b.extreme(rewards.max(dim=1).values, largest=True).detach()
    else:
        lo = hi = rewards.new_zeros(())
    if normalize == "minmax":
        # subtract first so that equal rewards normalise to exactly 1
        normalised = ((rewards - lo) + norm_eps) / ((hi - lo) + norm_eps)
    else:
        normalised = rewards
    scores = torch.stack([pc, pr], dim=1) + normalised  # [N, 2]: s_w, s_l
    s_w, s_l = scores[:, 0], scores[:, 1]

    marginal = torch.logsumexp(scores, dim=1)
    per_pair = -marginal - aux_weight * F.logsigmoid(s_w - s_l)
    if entropy is not None and entropy_weight != 0.0:
        per_pair = per_pair - entropy_weight * b.tensors[4]
    loss = b.average(per_pair)

    metrics = {
        "loss": loss,
        "logps/chosen": b.average(pc).detach(),
        "logps/rejected": b.average(pr).detach(),
        **_reward_metrics(b, beta * (pc - rc), beta * (pr - rr)),
        "mmpo/score_chosen": b.average(s_w).detach(),
        "mmpo/score_rejected": b.average(s_l).detach(),
        "mmpo/score_accuracy": b.fraction_true(s_w > s_l).detach(),
        "mmpo/reward_range": (hi - lo).detach(),
    }
    if entropy is not None:
        metrics["entropy"] = b.average(b.tensors[4]).detach()
    return loss, metrics


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float,
    gamma: float,
    pair_mask: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, dict]:
    """SimPO (reference-free) on length-averaged log-probs; returns (loss, metrics)."""
    b = _Batch([policy_chosen_logps, policy_rejected_logps], pair_mask, group)
    pc, pr = b.tensors
    per_pair = -F.logsigmoid(beta * (pc - pr) - gamma)
    loss = b.average(per_pair)
    metrics = {
        "loss": loss,
        "logps/chosen": b.average(pc).detach(),
        "logps/rejected": b.average(pr).detach(),
        **_reward_metrics(b, beta * pc, beta * pr),
    }
    return loss, metrics


def sft_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor | None = None,
    beta: float = 0.1,
    pair_mask: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, dict]:
    """SFT: the negative log-likelihood of the chosen answers (rejected ignored).

    With `chosen_tokens` (completion tokens per chosen answer, and summed log-probs),
    TRL SFTTrainer's token mean over the whole (global) batch: every chosen token's
    NLL counts once, `-(sum of chosen log-probs) / (number of chosen tokens)`.
    Without, the mean over real pairs of the given chosen log-probs. A reference
    (optional) only adds the `rewards/*` metrics.
    """
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("sft_loss: give both reference log-probs or neither")
    tensors = [policy_chosen_logps, policy_rejected_logps]
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        tensors += [ref_chosen_logps, ref_rejected_logps]
    b = _Batch(tensors, pair_mask, group)
    pc, pr = b.tensors[0], b.tensors[1]
    loss = -b.average(pc) if chosen_tokens is None else _token_mean_nll(b, pc, chosen_tokens)
    metrics = {
        "loss": loss,
        "logps/chosen": b.average(pc).detach(),
        "logps/rejected": b.average(pr).detach(),
    }
    if ref_chosen_logps is not None:
        rc, rr = b.tensors[2], b.tensors[3]
        metrics.update(_reward_metrics(b, beta * (pc - rc), beta * (pr - rr)))
    return loss, metrics


# loss name -> its PyTorch function, as `mmpo_jax.losses.registry.LOSSES` binds the JAX ones
# (`tests/test_loss_registry.py` checks both against the declarations)
LOSS_FUNCTIONS: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "mmpo": mmpo_loss,
    "dpo": dpo_loss,
    "simpo": simpo_loss,
    "sft": sft_loss,
    "cpo": cpo_loss,
    "orpo": orpo_loss,
}
