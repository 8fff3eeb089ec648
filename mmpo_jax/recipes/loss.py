"""The loss rules: which of our losses the recipe trains (loss.name) and its loss.* keys."""

from __future__ import annotations

from typing import Any, NoReturn

from mmpo_jax.errors import UserError
from mmpo_jax.losses.declarations import CPO_LOSS_TYPES, DPO_LOSS_TYPES, DECLARATIONS as LOSSES
from mmpo_jax.recipes.part import Part, Recipe, config_rule
from mmpo_jax.recipes.reading import as_bool, as_float, is_off
from mmpo_jax.recipes.render import flow_yaml
from mmpo_jax.recipes.table import carry

# Loss parameters and the losses that use them.
LOSS_KEYS = {
    "label_smoothing": ("dpo", "cpo"),
    "reference_free": ("dpo",),
    "loss_weights": ("dpo",),
    "f_divergence_type": ("dpo",),
    "f_alpha_divergence_coef": ("dpo",),
    "discopop_tau": ("dpo",),
    "rpo_alpha": ("dpo",),
    "use_weighting": ("dpo",),
    "ld_alpha": ("dpo",),
    "mmpo_reward_epsilon": ("mmpo",),
    "mmpo_optimize_entropy": ("mmpo",),
    "mmpo_relu_coefficient": ("mmpo",),
    "mmpo_relu_epsilon": ("mmpo",),
    "gamma_beta_ratio": ("simpo",),
    "simpo_gamma": ("simpo", "cpo"),
    "cpo_alpha": ("simpo", "cpo"),
    "alpha": ("cpo",),
    "sft_weight": ("simpo",),
}
# Keys only TRL's CPOTrainer has: a recipe with one of them is a CPO recipe.
CPO_KEYS = ("cpo_alpha", "simpo_gamma", "alpha")
# TRL's DPO loss types besides sigmoid that read label_smoothing
SMOOTHED_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")


def loss(recipe: Recipe, override: str | None) -> Part:
    """loss.* (and model.reference with precompute_ref_log_probs); `override`: the loss an
    override names, which replaces the recipe's own."""
    part = Part(recipe)
    name, source = _loss_name(part, override)
    part.set("loss.name", name, source)
    for key, owners in LOSS_KEYS.items():
        if name not in owners and part.has(key) and not is_off(recipe[key]):
            part.skip(key, part.raw(key), f"only {' and '.join(owners)} use it; this recipe's loss is {name}")
        elif name not in owners:
            part.raw(key)
    part.add(carry(recipe, "beta"))
    beta = part.values.get("loss.beta")
    part.add(_average_logps(recipe, name))
    # an override replaces the recipe's loss_type with its own loss (and that loss's default type)
    kinds = None if override else recipe.get("loss_type")
    if name == "dpo":
        part.add(_dpo_keys(recipe, kinds))
    elif name == "cpo":
        part.add(_cpo_keys(recipe, kinds))
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
    kinds = loss_type if isinstance(loss_type, list) else [loss_type]
    if objective is not None:
        by_objective = {s.objective_type: s.name for s in LOSSES.values() if s.objective_type}
        if objective not in by_objective:
            _unsupported("objective_type", objective, "")
        if kinds not in ([None], ["sigmoid"]):
            _unsupported("loss_type", loss_type, f"with objective_type {objective}")
        return by_objective[objective], "objective_type (the MMPO authors' fork)"
    cpo_recipe = any(part.has(key) for key in CPO_KEYS)
    if len(kinds) == 1 and kinds[0] in (None, "sigmoid") and not cpo_recipe:
        if part.has("gamma_beta_ratio"):
            return "simpo", "gamma_beta_ratio (the SimPO authors' recipe key)"
        return "dpo", "loss_type sigmoid" if loss_type else "TRL's default loss_type sigmoid"
    if len(kinds) == 1 and (cpo_recipe or kinds[0] == "simpo"):
        kind = kinds[0] or "sigmoid"
        if kind == "simpo" and part.has("cpo_alpha") and part.get("cpo_alpha", as_float) == 0:
            return "simpo", "loss_type simpo with cpo_alpha 0 (TRL's CPOTrainer, no NLL term)"
        if kind in CPO_LOSS_TYPES:
            return "cpo", f"loss_type {kind} with CPO's keys (TRL's CPOTrainer)"
    if all(kind in DPO_LOSS_TYPES for kind in kinds) and not cpo_recipe:
        return "dpo", f"loss_type {flow_yaml(loss_type)} (TRL's DPOTrainer)"
    _unsupported("loss_type", loss_type, "")


def _unsupported(key: str, value: Any, detail: str) -> NoReturn:
    detail = f" ({detail})" if detail else ""
    raise UserError(
        f"{key}: {flow_yaml(value)}{detail} has no counterpart here: ours has mmpo "
        f"(objective_type: mmpo), dpo (TRL's DPO loss types: {', '.join(DPO_LOSS_TYPES)}), "
        f"cpo ({', '.join(CPO_LOSS_TYPES)}), simpo and orpo (TRL's ORPO recipes name no loss: "
        "pass loss.name=orpo). Pass the override loss.name=mmpo|dpo|cpo|simpo|orpo|sft to "
        "convert the rest of the recipe anyway."
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


def _dpo_keys(recipe: Recipe, kinds: Any) -> Part:
    part = carry(recipe, "label_smoothing", "loss_weights", "f_divergence_type", "f_alpha_divergence_coef",
                 "discopop_tau", "use_weighting", "ld_alpha")
    if kinds is not None:
        part.set("loss.loss_type", kinds if isinstance(kinds, list) and len(kinds) > 1 else
                 (kinds[0] if isinstance(kinds, list) else kinds), "loss_type")
    types = [kinds] if isinstance(kinds, str) else (kinds or ["sigmoid"])
    smoothing = part.values.get("loss.label_smoothing")
    if "sigmoid" in types and smoothing:
        # TRL 1.16's sigmoid ignores label_smoothing; ours' smooths it (cDPO)
        others = [t for t in types if t in SMOOTHED_TYPES]
        if others:
            part.note(f"label_smoothing {smoothing}: ours' sigmoid component is conservative DPO with it "
                      f"(TRL 1.16's ignores it); {', '.join(others)} read it as TRL does")
        else:
            part.set("loss.label_smoothing", 0.0, "label_smoothing (TRL 1.16's sigmoid loss ignores it)")
            part.note(
                f"label_smoothing {smoothing}: TRL 1.16's sigmoid loss ignores it, so the converted run "
                "uses 0; ours' sigmoid with label_smoothing > 0 is conservative DPO (set "
                "loss.label_smoothing yourself if you meant that)"
            )
    single = types[0] if len(types) == 1 else None
    rpo = part.get("rpo_alpha", as_float)
    if rpo:
        if single == "sigmoid":
            part.set("loss.loss_type", ["sigmoid", "sft"], "rpo_alpha (TRL's RPO: sigmoid + NLL)")
            part.set("loss.loss_weights", [1.0, rpo], "rpo_alpha")
        else:
            part.skip("rpo_alpha", rpo, "add sft to loss.loss_type with its weight in loss.loss_weights")
    if part.get("reference_free", as_bool):
        part.skip(
            "reference_free",
            True,
            "ours' DPO always has a reference; loss.name=simpo, cpo or orpo are reference-free",
        )
    return part


def _cpo_keys(recipe: Recipe, kinds: Any) -> Part:
    part = carry(recipe, "label_smoothing", "simpo_gamma", "cpo_alpha", "alpha")
    kind = kinds[0] if isinstance(kinds, list) else kinds
    if kind is not None:
        part.set("loss.loss_type", kind, "loss_type")
    if not part.has("cpo_alpha"):
        part.note("cpo_alpha: TRL's CPOTrainer default 1.0 (the chosen answers' NLL term) applies")
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
    weight = part.get("sft_weight", as_float)
    if weight:
        part.skip("sft_weight", weight, "ours' SimPO has no NLL term; loss.name=cpo has one (cpo_alpha)")
    part.raw("cpo_alpha")  # 0: it is why this recipe is pure SimPO
    return part
