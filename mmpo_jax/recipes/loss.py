"""The loss rules: which of our losses the recipe trains (loss.name) and its loss.* keys."""

from __future__ import annotations

from typing import Any, NoReturn

from mmpo_jax.errors import UserError
from mmpo_jax.loss_registry import LOSSES
from mmpo_jax.recipes.part import Part, Recipe, config_rule
from mmpo_jax.recipes.reading import as_bool, as_float, is_off
from mmpo_jax.recipes.render import flow_yaml
from mmpo_jax.recipes.table import carry

# Loss parameters and the loss that uses them.
LOSS_KEYS = {
    "label_smoothing": "dpo",
    "reference_free": "dpo",
    "mmpo_reward_epsilon": "mmpo",
    "mmpo_optimize_entropy": "mmpo",
    "mmpo_relu_coefficient": "mmpo",
    "mmpo_relu_epsilon": "mmpo",
    "gamma_beta_ratio": "simpo",
    "simpo_gamma": "simpo",
    "cpo_alpha": "simpo",
    "sft_weight": "simpo",
}


def loss(recipe: Recipe, override: str | None) -> Part:
    """loss.* (and model.reference with precompute_ref_log_probs); `override`: the loss an
    override names, which replaces the recipe's own."""
    part = Part(recipe)
    name, source = _loss_name(part, override)
    part.set("loss.name", name, source)
    for key, owner in LOSS_KEYS.items():
        if owner != name and part.has(key) and not is_off(recipe[key]):
            part.skip(key, part.raw(key), f"only {owner} uses it; this recipe's loss is {name}")
        elif owner != name:
            part.raw(key)
    part.add(carry(recipe, "beta"))
    beta = part.values.get("loss.beta")
    part.add(_average_logps(recipe, name))
    if name == "dpo":
        part.add(_dpo_keys(recipe))
    elif name == "mmpo":
        part.add(_mmpo_keys(recipe, beta))
    elif name == "simpo":
        part.add(_simpo_keys(recipe, beta))
    precompute = part.get("precompute_ref_log_probs", as_bool)
    if precompute and getattr(LOSSES.get(name), "reference_use", None) != "unused":
        part.set("model.reference", "precomputed", "precompute_ref_log_probs")
    return part


def _loss_name(part: Part, override: str | None) -> tuple[str, str]:
    """Our loss and its source: `override`, objective_type (the MMPO fork), loss_type (TRL),
    else TRL's default sigmoid (DPO)."""
    objective = part.raw("objective_type")
    loss_type = part.raw("loss_type")
    if override:
        for key in ("objective_type", "loss_type"):
            if part.has(key):
                reason = f"replaced by the override loss.name={override}"
                part.skip(key, part.recipe[key], reason)
        return override, "override"
    if isinstance(loss_type, list):
        if len(loss_type) != 1:
            _unsupported("loss_type", loss_type, "a weighted sum of TRL losses")
        loss_type = loss_type[0]
    if objective is not None:
        by_objective = {s.objective_type: s.name for s in LOSSES.values() if s.objective_type}
        if objective not in by_objective:
            _unsupported("objective_type", objective, "")
        if loss_type not in (None, "sigmoid"):
            _unsupported("loss_type", loss_type, f"with objective_type {objective}")
        return by_objective[objective], "objective_type (the MMPO authors' fork)"
    if loss_type in (None, "sigmoid"):
        if part.has("gamma_beta_ratio"):
            return "simpo", "gamma_beta_ratio (the SimPO authors' recipe key)"
        return "dpo", "loss_type sigmoid" if loss_type else "TRL's default loss_type sigmoid"
    by_trl = {s.trl_loss_type: s.name for s in LOSSES.values() if s.trl_loss_type}
    if loss_type in by_trl:
        return by_trl[loss_type], f"loss_type {loss_type} (TRL's CPOTrainer)"
    _unsupported("loss_type", loss_type, "")


def _unsupported(key: str, value: Any, detail: str) -> NoReturn:
    detail = f" ({detail})" if detail else ""
    raise UserError(
        f"{key}: {flow_yaml(value)}{detail} has no counterpart here: ours has mmpo "
        "(objective_type: mmpo), dpo (loss_type: sigmoid) and simpo. Pass the override "
        "loss.name=mmpo|dpo|simpo to convert the rest of the recipe anyway."
    )


def _average_logps(recipe: Recipe, name: str) -> Part:
    part = Part(recipe)
    average = part.get("average_logps", as_bool)
    if average is None:
        return part
    # An unknown override name is refused by the whole config's check instead.
    loss = {"name": name} if name in LOSSES else {}
    if config_rule("loss.average_logps", average, **loss) is not None:
        part.skip(
            "average_logps",
            average,
            "ours' SimPO always averages the log-probs over completion tokens",
        )
    else:
        part.set("loss.average_logps", average, "average_logps")
    return part


def _dpo_keys(recipe: Recipe) -> Part:
    part = carry(recipe, "label_smoothing")
    if part.get("reference_free", as_bool):
        part.skip(
            "reference_free",
            True,
            "ours' DPO always has a reference; loss.name=simpo is reference-free",
        )
    return part


def _mmpo_keys(recipe: Recipe, beta: float | None) -> Part:
    part = carry(recipe, "mmpo_reward_epsilon")
    relu = part.get("mmpo_relu_coefficient", as_float)
    if relu:
        for key in ("mmpo_relu_coefficient", "mmpo_relu_epsilon"):
            if part.has(key):
                part.skip(
                    key,
                    recipe[key],
                    "a later ReLU-margin variant of the authors' loss that the contract "
                    "(docs/losses.md) does not define",
                )
    else:
        part.raw("mmpo_relu_epsilon")  # no effect with a zero coefficient
    entropy = part.get("mmpo_optimize_entropy", as_bool)
    if entropy is False:
        part.set("loss.entropy_weight", 0.0, "mmpo_optimize_entropy: false")
    elif entropy:
        if beta is None:
            part.skip(
                "mmpo_optimize_entropy",
                True,
                "the authors weight the entropy term by beta, which was not carried; set "
                "loss.entropy_weight (and loss.entropy_estimator=score_function) yourself",
            )
        else:
            source = "mmpo_optimize_entropy (the authors' code weights it by beta)"
            part.set("loss.entropy_weight", beta, source)
            part.set("loss.entropy_estimator", "score_function", source)
    return part


def _simpo_keys(recipe: Recipe, beta: float | None) -> Part:
    part = Part(recipe)
    ratio = part.get("gamma_beta_ratio", as_float)
    part.add(carry(recipe, "simpo_gamma"))
    if "loss.gamma" in part.values:
        if ratio is not None:
            part.skip("gamma_beta_ratio", ratio, "simpo_gamma is given and is used")
    elif ratio is not None:
        scale = beta if beta is not None else LOSSES["simpo"].beta
        where = "beta" if beta is not None else f"ours' default beta {LOSSES['simpo'].beta}"
        part.set("loss.gamma", ratio * scale, f"gamma_beta_ratio {ratio:g} x {where}")
    for key in ("cpo_alpha", "sft_weight"):
        weight = part.get(key, as_float)
        if weight:
            part.skip(key, weight, "ours is pure SimPO: no NLL term on the chosen answers")
    if recipe.get("loss_type") == "simpo" and not part.has("cpo_alpha"):
        part.note(
            "loss_type simpo: TRL's CPOTrainer adds cpo_alpha (default 1.0) x the NLL of the "
            "chosen answers; ours is pure SimPO (cpo_alpha 0)"
        )
    return part
