"""Per-pair tensors with padding pairs masked out, and global sums over a process group,
for the PyTorch reference losses (`mmpo_jax.torch_ref.losses`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.autograd.function import FunctionCtx

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Tensor = torch.Tensor


class _GlobalSum(torch.autograd.Function):
    """Sum over the group; the backward passes the gradient through unchanged.

    Every process evaluates the same global loss and seeds its own backward with
    1, so d(loss)/d(local sum) is just the incoming gradient. (torch's
    differentiable all_reduce would sum the seeds too: the gradient of the sum
    of the processes' identical losses, `world_size` times too large.)
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: ProcessGroup) -> Tensor:
        import torch.distributed as dist  # lazy: needed only with a process group (group=None never reaches it)

        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _all_reduce(x: Tensor, op: str, group: ProcessGroup | None) -> Tensor:
    if group is None:
        return x
    import torch.distributed as dist  # lazy: as in `_GlobalSum.forward`

    if op == "sum":
        return _GlobalSum.apply(x, group)
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX, group=group)
    return y


class _Batch:
    """Per-pair tensors with padding pairs removed from all statistics."""

    def __init__(self, tensors: list[Tensor], pair_mask: Tensor | None, group: ProcessGroup | None) -> None:
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


def _token_mean_nll(b: _Batch, chosen_sums: Tensor, tokens: Tensor) -> Tensor:
    """`-(sum of the chosen log-probs) / (number of chosen tokens)` over the group."""
    zero = chosen_sums.new_zeros(())
    count = _all_reduce(torch.where(b.real, tokens.detach().to(b.dtype), zero).sum(), "sum", b.group).detach()
    total = _all_reduce(torch.where(b.real, chosen_sums, zero).sum(), "sum", b.group)
    return -total / torch.clamp(count, min=1.0)
