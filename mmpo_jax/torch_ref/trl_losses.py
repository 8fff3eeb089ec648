"""TRL's DPO loss types, CPO and ORPO in PyTorch: the reference the JAX losses are checked
against, written from TRL 1.16's formulas (`DPOTrainer._compute_loss`,
`trl.experimental.cpo`, `trl.experimental.orpo`) the way TRL writes them (per-sequence
loss tensors summed with their weights, `torch.sort` of the real pairs for `aot`),
not translated from `mmpo_jax.losses.dpo`.

Arguments as `mmpo_jax.losses`, with `group` for `axis_name` (see
`mmpo_jax.torch_ref.losses`). `aot` / `aot_unpaired` sort this process's pairs only:
they take no group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mmpo_jax.torch_ref.pairs import Tensor, _Batch, _reward_metrics, _token_mean_nll

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _f_divergence_scores(logratios: Tensor, kind: str, coef: float) -> Tensor:
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        if abs(coef - 1.0) < 1e-6:
            return logratios
        t = torch.clamp((coef - 1.0) * logratios, max=80.0)
        return (torch.exp(t) - 1.0) / (coef - 1.0)
    raise ValueError(kind)


def _sorted_real(b: _Batch, x: Tensor) -> Tensor:
    if b.group is not None:
        raise NotImplementedError("the reference's aot sorts one process's pairs only")
    return torch.sort(x[b.real], dim=0).values


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    pair_weights: Tensor | None = None,
    chosen_unweighted_logps: Tensor | None = None,
    pair_mask: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, dict]:
    """TRL's DPO loss for `loss_type` (a name or a list, weighted by `loss_weights`);
    `sigmoid` keeps the conservative-DPO label smoothing."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights) if loss_weights else [1.0] * len(loss_types)
    tensors = [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps]
    tensors.append(pair_weights.detach() if pair_weights is not None else torch.ones_like(policy_chosen_logps))
    # LD-DPO: TRL's sft term reads the plain per-token log-probs
    tensors.append(policy_chosen_logps if chosen_unweighted_logps is None else chosen_unweighted_logps)
    b = _Batch(tensors, pair_mask, group)
    chosen_logps, rejected_logps, ref_chosen, ref_rejected = b.tensors[:4]
    # WPO (TRL: per_sequence_loss *= chosen_weights * rejected_weights, the sft scalar expanded)
    wpo, plain_chosen = b.tensors[4], b.tensors[5]
    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    chosen_scores = _f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = _f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    delta_score = chosen_scores - rejected_scores
    eps = label_smoothing

    def lengths(t: Tensor | None) -> Tensor:
        assert t is not None, "ipo / sigmoid_norm need the token counts"
        return t.to(b.dtype).clamp(min=1.0)

    loss = chosen_logps.new_zeros(())
    parts = {}
    for kind, weight in zip(loss_types, weights, strict=True):
        if kind == "sigmoid":
            per_seq = -(1 - eps) * F.logsigmoid(beta * delta_score) - eps * F.logsigmoid(-beta * delta_score)
        elif kind == "hinge":
            per_seq = torch.relu(1 - beta * delta_score)
        elif kind == "ipo":
            ipo_delta = chosen_scores / lengths(chosen_tokens) - rejected_scores / lengths(rejected_tokens)
            per_seq = (ipo_delta - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
            ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
            per_seq = qw * (log_qw - math.log1p(-eps)) + ql * (log_ql - math.log(eps))
        elif kind == "nca_pair":
            cr, rj = beta * chosen_logratios, beta * rejected_logratios
            per_seq = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rj)
        elif kind == "robust":
            clean = -(1 - eps) * F.logsigmoid(beta * delta_score)
            flipped = -eps * F.logsigmoid(-beta * delta_score)
            per_seq = (clean - flipped) / (1 - 2 * eps)
        elif kind == "bco_pair":
            per_seq = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
        elif kind == "sppo_hard":
            per_seq = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif kind in ("aot", "aot_unpaired"):
            if kind == "aot":
                delta = (_sorted_real(b, chosen_logps - rejected_logps)
                         - _sorted_real(b, ref_chosen - ref_rejected))
            else:
                delta = _sorted_real(b, chosen_logratios) - _sorted_real(b, rejected_logratios)
            sorted_loss = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
            part = sorted_loss.sum() / torch.clamp(b.n_real, min=1.0)
            parts[kind] = part
            loss = loss + weight * part
            continue
        elif kind == "apo_zero":
            per_seq = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
        elif kind == "apo_down":
            per_seq = (torch.sigmoid(beta * chosen_logratios)
                       + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
        elif kind == "discopop":
            logits = delta_score * beta
            modulation = torch.sigmoid(logits / discopop_tau)
            per_seq = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        elif kind == "sft":
            part = -b.average(plain_chosen) if chosen_tokens is None else _token_mean_nll(b, plain_chosen,
                                                                                         chosen_tokens)
            part = b.average(part.expand(chosen_logps.shape[0]) * wpo)
            parts[kind] = part
            loss = loss + weight * part
            continue
        elif kind == "sigmoid_norm":
            delta = chosen_scores / lengths(chosen_tokens) - rejected_scores / lengths(rejected_tokens)
            per_seq = -F.logsigmoid(beta * delta)
        else:
            raise ValueError(f"unknown loss type {kind}")
        parts[kind] = b.average(per_seq * wpo)
        loss = loss + weight * parts[kind]

    metrics = {
        "loss": loss,
        "logps/chosen": b.average(chosen_logps).detach(),
        "logps/rejected": b.average(rejected_logps).detach(),
        **_reward_metrics(b, beta * chosen_logratios, beta * rejected_logratios),
    }
    if len(loss_types) > 1:
        metrics.update({f"loss/{k}": v.detach() for k, v in parts.items()})
    return loss, metrics


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    alphapo_alpha: float = 0.0,
    chosen_tokens: Tensor | None = None,
    averaged: bool = False,
    pair_mask: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, dict]:
    """TRL's `CPOTrainer.cpo_loss` plus `cpo_alpha` x the chosen completions' cross-entropy."""
    b = _Batch([policy_chosen_logps, policy_rejected_logps], pair_mask, group)
    chosen_logps, rejected_logps = b.tensors
    if alphapo_alpha != 0.0:
        chosen_rewards = (1 - torch.exp(chosen_logps).pow(-alphapo_alpha)) / alphapo_alpha
        rejected_rewards = (1 - torch.exp(rejected_logps).pow(-alphapo_alpha)) / alphapo_alpha
    else:
        chosen_rewards, rejected_rewards = chosen_logps, rejected_logps
    logits = chosen_rewards - rejected_rewards
    eps = label_smoothing
    if loss_type == "simpo":
        logits = logits - gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    if chosen_tokens is None:
        nll = -b.average(chosen_logps)
    else:
        sums = chosen_logps * chosen_tokens.to(b.dtype) if averaged else chosen_logps
        nll = _token_mean_nll(b, sums, chosen_tokens)
    loss = b.average(losses) + cpo_alpha * nll
    metrics = {
        "loss": loss,
        "logps/chosen": b.average(chosen_logps).detach(),
        "logps/rejected": b.average(rejected_logps).detach(),
        **_reward_metrics(b, beta * chosen_rewards, beta * rejected_rewards),
        "nll_loss": nll.detach(),
    }
    return loss, metrics


def _log1mexp(x: Tensor) -> Tensor:
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_sequence_logps: Tensor,
    chosen_sequence_tokens: Tensor,
    pair_mask: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, dict]:
    """TRL's `ORPOTrainer`: the chosen rows' cross-entropy (prompt included) minus
    `beta` x the mean log-sigmoid of the log odds ratio of the averaged log-probs."""
    b = _Batch([policy_chosen_logps, policy_rejected_logps, chosen_sequence_logps], pair_mask, group)
    chosen_logps, rejected_logps, sequence_logps = b.tensors
    log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
    ratio = F.logsigmoid(log_odds)
    nll = _token_mean_nll(b, sequence_logps, chosen_sequence_tokens)
    loss = nll - beta * b.average(ratio)
    metrics = {
        "loss": loss,
        "logps/chosen": b.average(chosen_logps).detach(),
        "logps/rejected": b.average(rejected_logps).detach(),
        **_reward_metrics(b, beta * chosen_logps, beta * rejected_logps),
        "nll_loss": nll.detach(),
        "log_odds_ratio": b.average(ratio).detach(),
        "log_odds_chosen": b.average(log_odds).detach(),
    }
    return loss, metrics
