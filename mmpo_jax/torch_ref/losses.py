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

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class _GlobalSum(torch.autograd.Function):
    """Sum over the group; the backward passes the gradient through unchanged.

    Every process evaluates the same global loss and seeds its own backward with
    1, so d(loss)/d(local sum) is just the incoming gradient. (torch's
    differentiable all_reduce would sum the seeds too: the gradient of the sum
    of the processes' identical losses, `world_size` times too large.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _all_reduce(x: Tensor, op: str, group) -> Tensor:
    if group is None:
        return x
    import torch.distributed as dist

    if op == "sum":
        return _GlobalSum.apply(x, group)
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX, group=group)
    return y


class _Batch:
    """Per-pair tensors with padding pairs removed from all statistics."""

    def __init__(self, tensors: list[Tensor], pair_mask: Tensor | None, group):
        dtype = torch.promote_types(tensors[0].dtype, torch.float32)
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        self.tensors = [t.to(dtype) for t in tensors]
        n = self.tensors[0].shape[0]
        if pair_mask is None:
            self.real = torch.ones(n, dtype=torch.bool, device=self.tensors[0].device)
        else:
            self.real = pair_mask.to(self.tensors[0].device) > 0
        # padding pairs are set to 0 so nothing they hold reaches loss or gradient
        self.tensors = [
            torch.where(self.real, t, torch.zeros((), dtype=dtype, device=t.device))
            for t in self.tensors
        ]
        self.dtype = dtype
        self.group = group
        self.n_real = _all_reduce(self.real.to(dtype).sum(), "sum", group)

    def average(self, values: Tensor) -> Tensor:
        kept = torch.where(self.real, values, values.new_zeros(()))
        total = _all_reduce(kept.sum(), "sum", self.group)
        return total / torch.clamp(self.n_real, min=1.0)

    def fraction_true(self, cond: Tensor) -> Tensor:
        return self.average(cond.to(self.dtype))

    def extreme(self, values: Tensor, largest: bool) -> Tensor:
        fill = float("-inf") if largest else float("inf")
        kept = torch.where(self.real, values, values.new_full((), fill))
        local = kept.max() if largest else kept.min()
        return _all_reduce(local, "max" if largest else "min", self.group)


def _reward_metrics(b: _Batch, chosen_reward: Tensor, rejected_reward: Tensor) -> dict:
    return {
        "rewards/chosen": b.average(chosen_reward).detach(),
        "rewards/rejected": b.average(rejected_reward).detach(),
        "rewards/margins": b.average(chosen_reward - rejected_reward).detach(),
        "rewards/accuracies": b.fraction_true(chosen_reward > rejected_reward).detach(),
    }


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
    group=None,
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


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    pair_mask: Tensor | None = None,
    group=None,
) -> tuple[Tensor, dict]:
    """DPO with conservative label smoothing; returns (loss, metrics)."""
    b = _Batch(
        [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps],
        pair_mask,
        group,
    )
    pc, pr, rc, rr = b.tensors
    chosen_logratio = pc - rc
    rejected_logratio = pr - rr
    z = beta * (chosen_logratio - rejected_logratio)
    per_pair = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    loss = b.average(per_pair)
    metrics = {
        "loss": loss,
        "logps/chosen": b.average(pc).detach(),
        "logps/rejected": b.average(pr).detach(),
        **_reward_metrics(b, beta * chosen_logratio, beta * rejected_logratio),
    }
    return loss, metrics


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float,
    gamma: float,
    pair_mask: Tensor | None = None,
    group=None,
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
    group=None,
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
    if chosen_tokens is None:
        loss = -b.average(pc)
    else:
        tokens = torch.where(b.real, chosen_tokens.detach().to(b.dtype), pc.new_zeros(()))
        token_count = _all_reduce(tokens.sum(), "sum", group).detach()
        chosen_logp = _all_reduce(torch.where(b.real, pc, pc.new_zeros(())).sum(), "sum", group)
        loss = -chosen_logp / torch.clamp(token_count, min=1.0)
    metrics = {
        "loss": loss,
        "logps/chosen": b.average(pc).detach(),
        "logps/rejected": b.average(pr).detach(),
    }
    if ref_chosen_logps is not None:
        rc, rr = b.tensors[2], b.tensors[3]
        metrics.update(_reward_metrics(b, beta * (pc - rc), beta * (pr - rr)))
    return loss, metrics
