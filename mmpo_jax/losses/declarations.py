"""Every preference loss, declared once (`docs/losses.md` defines each).

A `LossDeclaration` says what a loss needs from the batch (reference log-probs, the
entropy bonus, token counts), its defaults (`beta`, `average_logps`), the `loss.*` keys
it reads and the metrics it reports. Everything else reads it: the config's choices and
defaults (`mmpo_jax.config_settle`), the binding of a loss's arguments
(`mmpo_jax.losses.binding`), the JAX functions of `mmpo_jax.losses.registry` and their
PyTorch twins, `mmpo-jax losses`, `convert-config` and `sweep`.

A leaf: it imports neither jax nor torch nor any other module of the package, so the
config and the CLI read it without loading either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mmpo_jax.config_schema import LossConfig

# What a loss does with reference log-probs: needs them; reads them when the run has
# a reference, for its rewards/* metrics only; never reads them.
ReferenceUse = Literal["required", "metrics_only", "unused"]

BASE_METRICS = ("loss", "logps/chosen", "logps/rejected")
NLL_METRIC = "nll_loss"
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
ENTROPY_METRIC = "entropy"


@dataclass(frozen=True)
class LossDeclaration:
    """One loss: what it needs, its defaults, its keys and its metrics (no function: the
    JAX one is bound in `mmpo_jax.losses.registry`, the PyTorch one in `mmpo_jax.torch_ref`)."""

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
    # the token counts it takes (`chosen_tokens`, `rejected_tokens`) with sequence sums
    token_counts: tuple[str, ...] = ()
    # takes `averaged` (whether the inputs are per-token means) and its token counts
    # whatever the reduction (its NLL term turns means back into sums)
    reads_averaged: bool = False
    # takes the chosen rows' log-prob sum and token count over every predicted token,
    # prompt included (`chosen_sequence_logps`, `chosen_sequence_tokens`)
    sequence_nll: bool = False
    # loss.* keys the step reads for it (how log-probs are reduced, weights), not the function
    step_options: tuple[str, ...] = ()
    # defaults of its options where they differ from the config's (`loss.gamma`)
    option_defaults: tuple[tuple[str, float], ...] = ()
    # `loss.loss_type` values whose default `average_logps` is true (CPO: as TRL's)
    averaged_types: tuple[str, ...] = ()
    # metrics besides BASE_METRICS and REWARD_METRICS (ENTROPY_METRIC comes with the entropy)
    metrics: tuple[str, ...] = ()
    # how the MMPO authors' fork (objective_type) and TRL (loss_type) name it, for convert-config
    objective_type: str | None = None
    trl_loss_type: str | None = None

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The `loss.*` keys this loss reads (the others do nothing for it)."""
        keys = ("name", "beta", *self.options, *self.step_options)
        if self.entropy:
            keys += ("entropy_estimator",)
        return keys + ("average_logps",)

    def metric_names(self, *, reference: bool, entropy: bool, components: tuple[str, ...] = ()
                     ) -> tuple[str, ...]:
        """The metrics it returns, in order, given a reference and the entropy bonus or not,
        and for a mixture of loss types (`components`, see `mixture`) one per component."""
        rewards = self.reference_use != "metrics_only" or reference
        names = BASE_METRICS + (REWARD_METRICS if rewards else ()) + self.metrics
        if len(components) > 1:
            names += tuple(f"loss/{kind}" for kind in components)
        return names + ((ENTROPY_METRIC,) if entropy and self.entropy else ())

    def option_default(self, key: str, fallback: float) -> float:
        return dict(self.option_defaults).get(key, fallback)


# TRL 1.16 DPOTrainer's loss types: name -> (what it is, its source). docs/losses.md has the formulas.
DPO_LOSS_TYPES: dict[str, tuple[str, str]] = {
    "sigmoid": ("DPO's logistic loss (conservative with label_smoothing)", "Rafailov et al. 2023; cDPO"),
    "hinge": ("hinge loss on the margin (SLiC)", "Zhao et al. 2023, arXiv 2305.10425"),
    "ipo": ("squared loss to 1/(2 beta) on per-token margins (IPO)", "Azar et al. 2023, arXiv 2310.12036"),
    "exo_pair": ("reverse KL to the smoothed labels (EXO)", "Ji et al. 2024, arXiv 2402.00856"),
    "nca_pair": ("noise contrastive alignment, pairwise (NCA)", "Chen et al. 2024, arXiv 2402.05369"),
    "robust": ("unbiased under label noise label_smoothing (rDPO)", "Chowdhury et al. 2024, arXiv 2403.00409"),
    "bco_pair": ("binary classifier optimisation, pairwise (BCO)", "Jung et al. 2024, arXiv 2404.04656"),
    "sppo_hard": ("SPPO with hard preference probabilities", "Wu et al. 2024, arXiv 2405.00675"),
    "aot": ("alignment via optimal transport, paired: sorted margins", "Melnyk et al. 2024, arXiv 2406.05882"),
    "aot_unpaired": ("AOT, unpaired: sorted log-ratios", "Melnyk et al. 2024, arXiv 2406.05882"),
    "apo_zero": ("anchored preference optimisation, chosen up", "D'Oosterlinck et al. 2024, arXiv 2408.06266"),
    "apo_down": ("APO, both down", "D'Oosterlinck et al. 2024, arXiv 2408.06266"),
    "discopop": ("the discovered log-ratio-modulated loss", "Chris Lu et al. 2024, arXiv 2406.08414"),
    "sft": ("token-mean NLL of the chosen answers (RPO's term)", "Pang et al. 2024, arXiv 2404.19733"),
    "sigmoid_norm": ("sigmoid loss on per-token margins", "TRL 1.16"),
}
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the types TRL allows a non-default f_divergence_type with (the others have no valid f-DPO form)
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# divide the scores by each answer's token count: sequence sums only (not average_logps)
PER_TOKEN_LOSS_TYPES = ("ipo", "sigmoid_norm")
# batch-level: sort over the global batch
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")
# TRL 1.16 CPOTrainer's loss types
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def dpo_type_problem(types: Sequence[str], weights: Sequence[float] | None, *, f_divergence_type: str,
                     label_smoothing: float, weighted: bool) -> tuple[str, str] | None:
    """The first rule a DPO loss-type mixture breaks, as `(option, what is wrong)`, or
    None: the one copy of these rules, which the config (naming the `loss.` key) and
    `dpo_loss` (a library caller's arguments) both apply. `weighted`: WPO's pair weights."""
    unknown = [t for t in types if t not in DPO_LOSS_TYPES]
    if unknown or not types:
        return "loss_type", f"choose from {', '.join(DPO_LOSS_TYPES)} (one name or a list)"
    if len(set(types)) != len(types):
        return "loss_type", "names a loss type twice; give it once with its weight in loss.loss_weights"
    if weights is not None and len(weights) != len(types):
        return "loss_weights", f"needs one weight per loss.loss_type ({len(types)})"
    refused = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
    if f_divergence_type != "reverse_kl" and refused:
        return "f_divergence_type", (f"does not apply to loss_type {', '.join(refused)} (TRL allows it with "
                                     f"{', '.join(F_DIVERGENCE_LOSS_TYPES)}); use reverse_kl")
    if "exo_pair" in types and not label_smoothing > 0:
        return "label_smoothing", "loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)"
    sorting = [t for t in types if t in SORTING_LOSS_TYPES]
    if weighted and sorting:
        return "use_weighting", (f"does not apply to loss_type {', '.join(sorting)} (it sorts the pairs, so "
                                 "per-pair weights would not line up; TRL refuses it too)")
    return None


def reduction(loss_cfg: LossConfig) -> dict[str, Any]:
    """How the step reduces per-token log-probs to the sequence log-probs `loss_cfg`'s loss
    reads, policy and reference alike: `pair_logps`' `average` and `ld_alpha` (the
    precomputed reference cache keys on these)."""
    assert loss_cfg.average_logps is not None, "a settled LossConfig"
    ld = loss_cfg.ld_alpha if "ld_alpha" in declaration_of(loss_cfg.name).step_options else None
    return {"average": bool(loss_cfg.average_logps), "ld_alpha": ld}


def weighting(loss_cfg: LossConfig) -> bool:
    """Whether the step computes WPO's pair weights for `loss_cfg` (`loss.use_weighting`)."""
    return "use_weighting" in declaration_of(loss_cfg.name).step_options and loss_cfg.use_weighting


def mixture(loss_cfg: LossConfig) -> tuple[str, ...]:
    """The loss types `loss_cfg` mixes (one for a single type; none for a loss without types)."""
    if "loss_type" not in declaration_of(loss_cfg.name).options:
        return ()
    kinds = loss_cfg.loss_type
    return (kinds,) if isinstance(kinds, str) else tuple(kinds)


DECLARATIONS: dict[str, LossDeclaration] = {
    declaration.name: declaration
    for declaration in (
        LossDeclaration(
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
        LossDeclaration(
            name="dpo",
            title="DPO",
            summary="direct preference optimisation, with TRL's loss types and their mixtures",
            reference_use="required",
            options=("loss_type", "loss_weights", "label_smoothing", "f_divergence_type",
                     "f_alpha_divergence_coef", "discopop_tau"),
            token_counts=("chosen_tokens", "rejected_tokens"),
            step_options=("use_weighting", "ld_alpha"),
            objective_type="dpo",
            trl_loss_type="sigmoid",
        ),
        LossDeclaration(
            name="simpo",
            title="SimPO",
            summary="SimPO: reference-free, length-averaged log-probs with a target margin",
            reference_use="unused",
            options=("gamma",),
            option_defaults=(("gamma", 1.0),),
            beta=2.0,
            average_logps=True,
            averaged_only=True,
            objective_type="simpo",
            trl_loss_type="simpo",
        ),
        LossDeclaration(
            name="sft",
            title="SFT",
            summary="supervised fine-tuning on the chosen answers (the rejected only reported)",
            reference_use="metrics_only",
            token_counts=("chosen_tokens",),
        ),
        LossDeclaration(
            name="cpo",
            title="CPO",
            summary="contrastive preference optimisation: reference-free, plus the chosen answers' NLL",
            reference_use="unused",
            options=("loss_type", "label_smoothing", "gamma", "cpo_alpha", "alphapo_alpha"),
            option_defaults=(("gamma", 0.5),),
            token_counts=("chosen_tokens",),
            reads_averaged=True,
            averaged_types=("ipo", "simpo"),
            metrics=(NLL_METRIC,),
        ),
        LossDeclaration(
            name="orpo",
            title="ORPO",
            summary="odds-ratio preference optimisation: reference-free, NLL plus the log odds ratio",
            reference_use="unused",
            average_logps=True,
            averaged_only=True,
            sequence_nll=True,
            metrics=(NLL_METRIC, "log_odds_ratio", "log_odds_chosen"),
        ),
    )
}
LOSS_NAMES = tuple(DECLARATIONS)


def loss_name_hint(name: str) -> str | None:
    """The keys that ask for `name` when it is not a loss name but one of TRL's DPO loss types
    (`loss.name=ipo` is `loss.name=dpo loss.loss_type=ipo`, as TRL's DPOConfig(loss_type=...))."""
    if name in DECLARATIONS:
        return None
    if name in DPO_LOSS_TYPES:
        return f"{name} is a DPO loss type (TRL's DPOConfig loss_type): set loss.name=dpo loss.loss_type={name}"
    if name == "rpo":  # TRL's RPO is DPO's sigmoid plus the chosen answers' NLL (rpo_alpha)
        return "RPO is DPO's sigmoid loss plus the chosen answers' NLL: set loss.name=dpo loss.loss_type=[sigmoid,sft]"
    return None


# Losses that run without a reference model (`model.reference: auto` gives none for them).
REFERENCE_FREE_LOSSES = tuple(name for name, declaration in DECLARATIONS.items()
                              if declaration.reference_use != "required")


def declaration_of(name: str) -> LossDeclaration:
    """The declaration of loss `name` (a ValueError naming the choices if there is none)."""
    try:
        return DECLARATIONS[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}") from None


def entropy_estimator(loss_cfg: LossConfig) -> Literal["token", "score_function"] | None:
    """The estimator of the entropy bonus the step computes for `loss_cfg`, or None when
    its loss takes none or `entropy_weight` is 0 (then no entropy is computed)."""
    if declaration_of(loss_cfg.name).entropy and loss_cfg.entropy_weight > 0:
        return loss_cfg.entropy_estimator
    return None
