"""The PyTorch reference of one train step's loss and gradients (no update).

A transformers `LlamaForCausalLM` (optionally with LoRA adapters, written here from
PEFT's definition: `base(x) + scale * B(A(dropout(x)))`) runs the pair-major batch
of `mmpo_jax.train.step` the way TRL does: chosen and rejected rows in one forward,
log-softmax in float32, per-token log-probs of the completion tokens summed (or
averaged), the reference's under `no_grad`, then the loss of `mmpo_jax.torch_ref.losses`.
With `grad_accum` micro-batches (pairs a, a+n, a+2n, ... as ours), each is normalised on
its own and the gradients and metrics are their means.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mmpo_jax.losses import declarations as loss_declarations
from mmpo_jax.losses.binding import bind
from mmpo_jax.losses.inputs import LossInputs
from mmpo_jax.torch_ref.losses import LOSS_FUNCTIONS

if TYPE_CHECKING:
    from mmpo_jax.config_schema import LossConfig


class LoraLinear(nn.Module):
    """`base(x) + scale * (dropout(x) @ lora_A.T) @ lora_B.T` (PEFT's LoRA layer)."""

    def __init__(self, base: nn.Linear, a: np.ndarray, b: np.ndarray, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.as_tensor(a, dtype=base.weight.dtype).clone())  # [r, in]
        self.lora_B = nn.Parameter(torch.as_tensor(b, dtype=base.weight.dtype).clone())  # [out, r]
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T


def add_lora(model: nn.Module, adapters: dict[str, np.ndarray], scale: float) -> None:
    """Wraps the targeted Linear layers of `model` with `LoraLinear`, the base frozen.

    `adapters`: PEFT names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)
    -> torch-layout arrays, as `mmpo_jax.models.lora_export.iter_peft_weights` gives them.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    prefix = "base_model.model."
    modules = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in adapters})
    for path in modules:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, child)
        a = adapters[f"{prefix}{path}.lora_A.weight"]
        b = adapters[f"{prefix}{path}.lora_B.weight"]
        setattr(parent, child, LoraLinear(base, a, b, scale))


def peft_name(torch_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A` -> PEFT's saved name."""
    return f"base_model.model.{torch_name}.weight"


def pair_logps(model: nn.Module, input_ids: np.ndarray, loss_mask: np.ndarray, *, average: bool,
               entropy_estimator: str | None, chosen_sequence: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """`[pairs, 2]` sequence log-probs, the `[pairs]` entropy bonus and, with
    `chosen_sequence`, the chosen rows' log-prob sum and token count over every token
    from the second to the last completion token (see `mmpo_jax.train.pair_logps` for
    the definitions)."""
    pairs, two, seq = input_ids.shape
    ids = torch.as_tensor(input_ids.reshape(pairs * two, seq), dtype=torch.long)
    mask = torch.as_tensor(loss_mask.reshape(pairs * two, seq), dtype=torch.float32)
    # right padding: causal attention alone keeps real tokens from seeing the padding
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    tok = torch.gather(logp_all, -1, ids[:, 1:, None])[..., 0]
    tok = torch.cat([torch.zeros_like(tok[:, :1]), tok], dim=1)  # aligned with the ids
    total = (tok * mask).sum(-1)
    count = mask.sum(-1).clamp_min(1.0)
    seq_logps = (total / count if average else total).reshape(pairs, two)
    entropy = None
    if entropy_estimator is not None:
        h = -(logp_all.exp() * logp_all).sum(-1)
        h = torch.cat([torch.zeros_like(h[:, :1]), h], dim=1) * mask
        if entropy_estimator == "score_function":
            prefix = torch.cumsum(tok * mask, dim=-1)
            h = h + h.detach() * prefix * mask
        e = h.sum(-1)
        entropy = (e / count if average else e).reshape(pairs, two).mean(dim=1)
    whole = None
    if chosen_sequence:
        chosen_mask = loss_mask[:, 0]
        last = np.array([np.flatnonzero(row).max() if row.any() else 0 for row in chosen_mask])
        positions = np.arange(seq)
        covered = torch.as_tensor((positions >= 1) & (positions <= last[:, None]), dtype=torch.float32)
        chosen_tok = tok.reshape(pairs, two, seq)[:, 0]
        whole = ((chosen_tok * covered).sum(-1), covered.sum(-1))
    return seq_logps, entropy, whole


def configured_loss(loss_cfg: LossConfig, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
    """The PyTorch twin of the loss `loss_cfg` names, on a `LossInputs` of `[pairs]` tensors,
    its arguments bound as the JAX step binds them (`mmpo_jax.losses.binding.bind`)."""
    return bind(loss_cfg, LOSS_FUNCTIONS.__getitem__)(inputs)


def step_loss_and_grads(
    policy: nn.Module,
    reference: nn.Module | None,
    batch: dict[str, np.ndarray],
    loss_cfg: LossConfig,
    grad_accum: int,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics (means over micro-batches) and gradients `{param name: float64 array}` of
    the trainable parameters, for one step's `batch` (`input_ids`, `loss_mask`,
    `pair_mask`, and `ref_logps` when `reference` is None and the loss needs one)."""
    n = grad_accum
    assert loss_cfg.average_logps is not None, "a settled LossConfig"
    spec = loss_declarations.declaration_of(loss_cfg.name)
    estimator = loss_declarations.entropy_estimator(loss_cfg)
    policy.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for a in range(n):
        mb = {k: v[a::n] for k, v in batch.items()}
        logps, entropy, whole = pair_logps(policy, mb["input_ids"], mb["loss_mask"],
                                           average=loss_cfg.average_logps, entropy_estimator=estimator,
                                           chosen_sequence=spec.sequence_nll)
        ref = None
        # a loss that reads a reference only for its metrics (sft) gets one when the run has it
        has_reference = reference is not None or "ref_logps" in mb
        if spec.reference_use == "required" or (spec.reference_use == "metrics_only" and has_reference):
            if reference is not None:
                with torch.no_grad():
                    ref, _, _ = pair_logps(reference, mb["input_ids"], mb["loss_mask"],
                                        average=loss_cfg.average_logps, entropy_estimator=None)
            else:
                ref = torch.as_tensor(mb["ref_logps"], dtype=torch.float32)
        tokens = torch.as_tensor(mb["loss_mask"].sum(-1), dtype=torch.float32)  # [pairs, 2]
        pair_mask = torch.as_tensor(mb["pair_mask"], dtype=torch.float32)
        inputs = LossInputs.from_pairs(logps, tokens, pair_mask, ref=ref, entropy=entropy, chosen_sequence=whole)
        loss, metrics = configured_loss(loss_cfg, inputs)
        (loss / n).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / n
    grads = {name: p.grad.detach().double().numpy() for name, p in policy.named_parameters()
             if p.requires_grad and p.grad is not None}
    return sums, grads
