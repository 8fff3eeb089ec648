"""Every preference loss, declared once (`docs/losses.md` defines each).

A `LossSpec` says what a loss needs from the batch (reference log-probs, the entropy
bonus, token counts), its defaults (`beta`, `average_logps`), the `loss.*` keys it
reads and the metrics it reports. Everything else reads it: the config's choices and
defaults, the dispatch of the JAX step and of the PyTorch reference (`call_arguments`),
`mmpo-jax losses`, `convert-config` and `sweep`.

Adding a loss: a `LossSpec` in `LOSSES`, its JAX function `<name>_loss` in
`mmpo_jax.losses` and its PyTorch twin of the same name in `mmpo_jax.torch_ref.losses`
(same arguments: `[pairs]` log-probs first, then keywords), and their tests.

This module imports neither jax nor torch: the config and the CLI read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mmpo_jax.config_schema import LossConfig

# What a loss does with reference log-probs: needs them; reads them when the run has
# a reference, for its rewards/* metrics only; never reads them.
ReferenceUse = Literal["required", "metrics_only", "unused"]

BASE_METRICS = ("loss", "logps/chosen", "logps/rejected")
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
ENTROPY_METRIC = "entropy"


@dataclass(frozen=True)
class LossSpec:
    """One loss: what it needs, its defaults, its keys and its metrics."""

    name: str
    title: str  # as the papers write it, for messages
    summary: str
    reference_use: ReferenceUse
    # loss.* keys passed to the function as keyword arguments of the same name
    options: tuple[str, ...] = ()
    # the default of loss.beta (for sft: the scale of its rewards/* metrics only)
    beta: float = 0.1
    # the default of loss.average_logps; `averaged_only`: true is the only value allowed
    average_logps: bool = False
    averaged_only: bool = False
    # takes the per-pair entropy bonus (`entropy`, with loss.entropy_weight > 0,
    # estimated as loss.entropy_estimator says)
    entropy: bool = False
    # takes the chosen answers' token counts (`chosen_tokens`) with sequence sums
    token_mean: bool = False
    # metrics besides BASE_METRICS and REWARD_METRICS (ENTROPY_METRIC comes with the entropy)
    metrics: tuple[str, ...] = ()
    # how the MMPO authors' fork (objective_type) and TRL (loss_type) name it, for convert-config
    objective_type: str | None = None
    trl_loss_type: str | None = None

    @property
    def function(self) -> str:
        """The function's name in `mmpo_jax.losses` and `mmpo_jax.torch_ref.losses`."""
        return f"{self.name}_loss"

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The `loss.*` keys this loss reads (the others do nothing for it)."""
        keys = ("name", "beta", *self.options)
        if self.entropy:
            keys += ("entropy_estimator",)
        return keys + ("average_logps",)

    def metric_names(self, *, reference: bool, entropy: bool) -> tuple[str, ...]:
        """The metrics it returns, in order, given a reference and the entropy bonus or not."""
        rewards = self.reference_use != "metrics_only" or reference
        names = BASE_METRICS + (REWARD_METRICS if rewards else ()) + self.metrics
        return names + ((ENTROPY_METRIC,) if entropy and self.entropy else ())


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            name="mmpo",
            title="MMPO",
            summary="maximum marginal likelihood of the preferred output (the paper's method)",
            reference_use="required",
            options=("reward_epsilon", "rejected_epsilon", "norm_eps", "aux_weight", "normalize",
                     "entropy_weight"),
            entropy=True,
            metrics=("mmpo/score_chosen", "mmpo/score_rejected", "mmpo/score_accuracy", "mmpo/reward_range"),
            objective_type="mmpo",
        ),
        LossSpec(
            name="dpo",
            title="DPO",
            summary="direct preference optimisation (sigmoid loss, optional label smoothing)",
            reference_use="required",
            options=("label_smoothing",),
            objective_type="dpo",
            trl_loss_type="sigmoid",
        ),
        LossSpec(
            name="simpo",
            title="SimPO",
            summary="SimPO: reference-free, length-averaged log-probs with a target margin",
            reference_use="unused",
            options=("gamma",),
            beta=2.0,
            average_logps=True,
            averaged_only=True,
            objective_type="simpo",
            trl_loss_type="simpo",
        ),
        LossSpec(
            name="sft",
            title="SFT",
            summary="supervised fine-tuning on the chosen answers (the rejected only reported)",
            reference_use="metrics_only",
            token_mean=True,
        ),
    )
}
LOSS_NAMES = tuple(LOSSES)
# Losses that run without a reference model (`model.reference: auto` gives none for them).
REFERENCE_FREE_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.reference_use != "required")


def spec_of(name: str) -> LossSpec:
    """The declaration of loss `name` (a ValueError naming the choices if there is none)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}") from None


def entropy_estimator(loss_cfg: LossConfig) -> Literal["token", "score_function"] | None:
    """The estimator of the entropy bonus the step computes for `loss_cfg`, or None when
    its loss takes none or `entropy_weight` is 0 (then no entropy is computed)."""
    if spec_of(loss_cfg.name).entropy and loss_cfg.entropy_weight > 0:
        return loss_cfg.entropy_estimator
    return None


def settings(loss_cfg: LossConfig, name: str | None = None) -> tuple[float, bool]:
    """`(beta, average_logps)` loss `name` runs with: the config's for the configured loss,
    the loss's own defaults for another (the example batch runs every loss)."""
    if name is None or name == loss_cfg.name:
        assert loss_cfg.beta is not None and loss_cfg.average_logps is not None, "a settled LossConfig"
        return float(loss_cfg.beta), bool(loss_cfg.average_logps)
    spec = spec_of(name)
    return spec.beta, spec.average_logps


def call_arguments(loss_cfg: LossConfig, inputs: Any, *, name: str | None = None,
                   beta: float | None = None) -> tuple[LossSpec, tuple[Any, ...], dict[str, Any]]:
    """The function, positional and keyword arguments of the loss `loss_cfg` names (or
    `name`) on `inputs` (a `mmpo_jax.loss_inputs.LossInputs` of JAX or torch arrays).

    The one dispatch from a config to a loss call, for JAX and PyTorch alike: the
    reference log-probs when the loss reads them, the entropy bonus when given (else
    `entropy_weight` 0), the chosen token counts for a token-mean loss on sequence sums,
    and the `options` keys of the config.
    """
    spec = spec_of(loss_cfg.name if name is None else name)
    own_beta, average = settings(loss_cfg, spec.name)
    args: tuple[Any, ...] = (inputs.policy_chosen, inputs.policy_rejected)
    has_reference = inputs.ref_chosen is not None
    if spec.reference_use == "required" and not has_reference:
        raise ValueError(f"loss {spec.name!r} needs reference log-probs (ref_chosen, ref_rejected)")
    if spec.reference_use != "unused" and has_reference:
        args += (inputs.ref_chosen, inputs.ref_rejected)
    kwargs: dict[str, Any] = {"beta": own_beta if beta is None else beta}
    kwargs.update({key: getattr(loss_cfg, key) for key in spec.options})
    if spec.entropy:
        kwargs["entropy"] = inputs.entropy
        if inputs.entropy is None:
            kwargs["entropy_weight"] = 0.0
    if spec.token_mean and not average and inputs.chosen_tokens is not None:
        kwargs["chosen_tokens"] = inputs.chosen_tokens
    kwargs["pair_mask"] = inputs.pair_mask
    return spec, args, kwargs


def used_inputs(loss_cfg: LossConfig, inputs: Any) -> Any:
    """`inputs` without the fields the configured loss does not read (None), so a step
    passes only what it uses into `shard_map`."""
    spec, args, kwargs = call_arguments(loss_cfg, inputs)
    keep_ref = len(args) == 4
    return inputs.replace(
        ref_chosen=inputs.ref_chosen if keep_ref else None,
        ref_rejected=inputs.ref_rejected if keep_ref else None,
        chosen_tokens=kwargs.get("chosen_tokens"),
        rejected_tokens=None,
        entropy=kwargs.get("entropy"),
    )
