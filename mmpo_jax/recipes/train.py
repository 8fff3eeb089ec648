"""The run rules: seed, output directory, run name, trackers, and how often it logs,
evaluates and saves."""

from __future__ import annotations

from typing import Any

from mmpo_jax.config_schema import TrainConfig
from mmpo_jax.recipes.part import Part, Recipe, config_rule
from mmpo_jax.recipes.reading import as_int
from mmpo_jax.recipes.steps import RunLength, step_count
from mmpo_jax.recipes.table import carry
from mmpo_jax.train.trackers import TRACKERS

# transformers' defaults a recipe relies on when it omits the key.
HF_SAVE_STEPS = 500
HF_LOGGING_STEPS = 500


def train(recipe: Recipe, length: RunLength, *, data_seeded: bool, test_data: bool) -> Part:
    """train.* (and data.seed from seed unless `data_seeded`, by data_seed); `test_data`:
    whether the conversion names test data (evaluated before and after training)."""
    part = Part(recipe)
    seed = part.get("seed", as_int)
    # The seed also orders the shuffle (data.seed), so it is held to that key's rule.
    rule = None if seed is None else config_rule("data.seed", seed)
    if seed is not None and rule is None:
        part.set("train.seed", seed, "seed")
        if not data_seeded:
            part.set("data.seed", seed, "seed (the shuffle order)")
    elif seed is not None and rule is not None:
        part.skip("seed", seed, rule)
    part.add(carry(recipe, "output_dir", "run_name"))
    part.add(trackers(recipe))
    part.add(logging(recipe, length))
    part.add(evaluation(recipe, length, test_data))
    part.add(saving(recipe, length))
    return part


def _names(value: Any) -> list[str]:
    # transformers takes one name or a list of them
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("expected a tracker name or a list of them")


def trackers(recipe: Recipe) -> Part:
    """train.report_to from transformers' report_to: the trackers ours has, in the
    recipe's order; "all" as all of ours; the others listed."""
    part = Part(recipe)
    # null asks for transformers' default, which changed between versions: ours keeps its own
    names = None if part.raw("report_to") is None else part.get("report_to", _names)
    if names is None:
        return part
    wanted = list(dict.fromkeys(names))
    if wanted in ([], ["none"]):
        part.set("train.report_to", "none", "report_to")
    elif "all" in wanted:
        # transformers' "all" is every integration installed where it runs, which the
        # conversion cannot see
        part.set("train.report_to", list(TRACKERS), "report_to all (every tracker of ours)")
        part.note(
            f"report_to all: transformers reports to every integration installed; "
            f"train.report_to names all of ours ({', '.join(TRACKERS)}), and a run stops at "
            "start naming the package to install for one that is missing: drop it from "
            "train.report_to instead"
        )
    else:
        ours = [n for n in wanted if n in TRACKERS]
        if ours:
            part.set("train.report_to", ours, "report_to")
        others = [n for n in wanted if n not in (*TRACKERS, "none")]
        if others:
            part.skip(
                "report_to",
                others,
                f"ours reports to {', '.join(TRACKERS)} (train.report_to), besides "
                "metrics.jsonl in train.output_dir",
            )
    return part


def _per_epoch(part: Part, key: str, value: Any, length: RunLength) -> int | None:
    if length.steps_per_epoch is None:
        part.skip(key, value, "once per epoch needs --train-rows N (the steps in an epoch)")
    return length.steps_per_epoch


def _steps_of(part: Part, key: str, length: RunLength) -> int | None:
    # null asks for nothing: transformers' default applies
    return part.get(key, lambda v: None if v is None else step_count(v, length.total_steps))


def logging(recipe: Recipe, length: RunLength) -> Part:
    """train.log_every from logging_strategy / logging_steps."""
    part = Part(recipe)
    strategy = part.raw("logging_strategy", "steps")
    if strategy == "epoch":
        every = _per_epoch(part, "logging_strategy", strategy, length)
        if every:
            part.set("train.log_every", every, "logging_strategy epoch")
    elif strategy == "no":
        part.skip("logging_strategy", strategy, "ours always logs (train.log_every >= 1)")
    elif part.has("logging_steps"):
        every = _steps_of(part, "logging_steps", length)
        if every:
            part.set("train.log_every", every, "logging_steps")
    return part


def evaluation(recipe: Recipe, length: RunLength, test_data: bool) -> Part:
    """train.eval_every from eval_strategy (or its old name) and eval_steps."""
    part = Part(recipe)
    key = "eval_strategy" if part.has("eval_strategy") else "evaluation_strategy"
    strategy = part.raw(key, "no")
    steps_key = "eval_steps" if part.raw("eval_steps") is not None else "logging_steps"
    if strategy == "steps":
        # transformers evaluates every logging_steps when eval_steps is not given
        if recipe.get(steps_key) is None:
            source = f"{key} steps, transformers' default logging_steps"
            part.set("train.eval_every", HF_LOGGING_STEPS, source)
            return part
        every = _steps_of(part, steps_key, length)
        if every:
            part.set("train.eval_every", every, f"{key} steps, {steps_key}")
    elif strategy == "epoch":
        every = _per_epoch(part, key, strategy, length)
        if every:
            part.set("train.eval_every", every, f"{key} epoch")
    elif strategy == "no":
        if part.has(key):
            part.set("train.eval_every", 0, f"{key} no")
        if test_data:
            part.note(
                "no periodic eval: ours still evaluates data.test_files before and after "
                "training"
            )
    else:
        part.skip(key, strategy, "ours evaluates every train.eval_every steps")
    return part


def saving(recipe: Recipe, length: RunLength) -> Part:
    """train.save_every and train.keep_checkpoints."""
    part = Part(recipe)
    strategy = part.raw("save_strategy")
    if strategy == "epoch":
        every = _per_epoch(part, "save_strategy", strategy, length)
        if every:
            part.set("train.save_every", every, "save_strategy epoch")
    elif strategy == "no":
        part.set("train.save_every", 0, "save_strategy no (ours saves at the end)")
    elif strategy in ("steps", None):
        if part.raw("save_steps") is not None:
            every = _steps_of(part, "save_steps", length)
            if every:
                part.set("train.save_every", every, "save_steps")
        elif strategy == "steps":
            part.set("train.save_every", HF_SAVE_STEPS, "transformers' default save_steps")
    else:
        part.skip("save_strategy", strategy, "ours saves every train.save_every steps")
    if part.has("save_total_limit"):
        limit = part.raw("save_total_limit")
        if limit is None:
            part.skip(
                "save_total_limit",
                limit,
                "transformers keeps every checkpoint; ours keeps the last "
                f"train.keep_checkpoints (default {TrainConfig().keep_checkpoints})",
            )
        else:
            limit = part.get("save_total_limit", as_int)
            if limit is not None and config_rule("train.keep_checkpoints", limit) is None:
                part.set("train.keep_checkpoints", limit, "save_total_limit")
            elif limit is not None:
                part.skip("save_total_limit", limit, "ours keeps at least one checkpoint")
    return part
