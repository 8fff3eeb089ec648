"""A loss with its config's arguments bound once, then called on each micro-batch.

    loss = bind(loss_cfg, function_of)        # once, from the settled `loss` section
    value, metrics = loss(inputs, axis_name=BATCH_AXES)   # per micro-batch

The one dispatch from a config to a loss call, for the JAX functions
(`mmpo_jax.losses.registry.bind_loss`) and their PyTorch twins
(`mmpo_jax.torch_ref.step.configured_loss`) alike: what a loss reads is its
`LossDeclaration`; binding reads the config (its options, `beta`, `average_logps`, the
other loss's defaults when another loss is asked for) once, and a call only picks the
declared `LossInputs` fields that are given. Imports neither jax nor torch (nor flax).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmpo_jax.config_schema import LossConfig
from mmpo_jax.config_settle import settle_loss
from mmpo_jax.losses.declarations import LossDeclaration, declaration_of

if TYPE_CHECKING:
    from mmpo_jax.losses.inputs import LossInputs

# `(policy_chosen, policy_rejected[, ref_chosen, ref_rejected], **keywords) -> (loss, metrics)`
LossFunction = Callable[..., tuple[Any, dict[str, Any]]]
# the `LossInputs` fields a loss may read besides the policy's log-probs and the pair mask
# (each passed as the keyword of its name, the reference's positionally)
OPTIONAL_FIELDS = ("ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens", "entropy",
                   "chosen_sequence_logps", "chosen_sequence_tokens", "pair_weights", "chosen_unweighted_logps")


@dataclass(frozen=True)
class BoundLoss:
    """One loss and the arguments its config fixes (see the module docstring)."""

    declaration: LossDeclaration
    function: LossFunction
    # the log-probs it takes are per-token means (the settled loss.average_logps), not sums
    averaged: bool
    # beta, the loss.* options and `averaged`: what the config says, the same every call
    keywords: Mapping[str, Any]
    # the `LossInputs` fields it reads when they are given (passed as the keyword of their name)
    optional: tuple[str, ...]
    # the fields it needs, each group with the error a call without them raises
    required: tuple[tuple[tuple[str, ...], str], ...]

    @property
    def reads(self) -> tuple[str, ...]:
        """Every field of `OPTIONAL_FIELDS` this loss reads (the others `used` drops)."""
        reference = ("ref_chosen", "ref_rejected") if self.declaration.reference_use != "unused" else ()
        entropy = ("entropy",) if self.declaration.entropy else ()
        needed = tuple(name for names, _ in self.required for name in names)
        return reference + entropy + self.optional + needed

    def used(self, inputs: LossInputs) -> LossInputs:
        """`inputs` without the fields this loss does not read (None), so a step passes only
        what it uses into `shard_map`."""
        reads = self.reads
        return dataclasses.replace(inputs, **{name: None for name in OPTIONAL_FIELDS if name not in reads})

    def arguments(self, inputs: LossInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments of the call on `inputs` (`[pairs]` arrays):
        the reference's log-probs when the loss reads them and they are given, the entropy
        bonus when given (else `entropy_weight` 0), the declared fields that are given."""
        declared = self.declaration
        has_reference = inputs.ref_chosen is not None
        if declared.reference_use == "required" and not has_reference:
            raise ValueError(f"loss {declared.name!r} needs reference log-probs (ref_chosen, ref_rejected)")
        args: tuple[Any, ...] = (inputs.policy_chosen, inputs.policy_rejected)
        if declared.reference_use != "unused" and has_reference:
            args += (inputs.ref_chosen, inputs.ref_rejected)
        kwargs = dict(self.keywords)
        if declared.entropy:
            kwargs["entropy"] = inputs.entropy
            if inputs.entropy is None:
                kwargs["entropy_weight"] = 0.0
        kwargs.update({name: getattr(inputs, name) for name in self.optional if getattr(inputs, name) is not None})
        for names, error in self.required:
            if any(getattr(inputs, name) is None for name in names):
                raise ValueError(error)
            kwargs.update({name: getattr(inputs, name) for name in names})
        kwargs["pair_mask"] = inputs.pair_mask
        return args, kwargs

    def __call__(self, inputs: LossInputs, **extra: Any) -> tuple[Any, dict[str, Any]]:
        """`(loss, metrics)` on `inputs`; `extra`: the function's own keywords (`axis_name`
        for JAX, `group` for torch)."""
        args, kwargs = self.arguments(inputs)
        return self.function(*args, **extra, **kwargs)


def bind(loss_cfg: LossConfig, function_of: Callable[[str], LossFunction], *, name: str | None = None,
         beta: float | None = None) -> BoundLoss:
    """The loss the settled `loss_cfg` names (or `name`, at its own defaults, with `beta`
    if given), its function `function_of(name)`, its config's arguments bound."""
    declared = declaration_of(loss_cfg.name if name is None else name)
    if declared.name != loss_cfg.name:
        # another loss than the configured one runs with its own defaults throughout
        loss_cfg = settle_loss(LossConfig(name=declared.name))
    assert loss_cfg.beta is not None and loss_cfg.average_logps is not None, "a settled LossConfig"
    average = bool(loss_cfg.average_logps)
    keywords: dict[str, Any] = {"beta": float(loss_cfg.beta) if beta is None else beta}
    keywords.update({key: getattr(loss_cfg, key) for key in declared.options})
    if declared.reads_averaged:
        keywords["averaged"] = average
    optional: tuple[str, ...] = ()
    if declared.token_counts and (declared.reads_averaged or not average):
        optional += declared.token_counts
    if "ld_alpha" in declared.step_options:
        optional += ("chosen_unweighted_logps",)
    required: tuple[tuple[tuple[str, ...], str], ...] = ()
    if "use_weighting" in declared.step_options and loss_cfg.use_weighting:
        required += ((("pair_weights",), "loss.use_weighting: the step gives WPO's pair_weights with the log-probs"),)
    if declared.sequence_nll:
        required += ((("chosen_sequence_logps", "chosen_sequence_tokens"),
                      f"loss {declared.name!r} needs the chosen rows' whole-sequence log-probs "
                      "(chosen_sequence_logps, chosen_sequence_tokens)"),)
    return BoundLoss(declared, function_of(declared.name), average, keywords, optional, required)
