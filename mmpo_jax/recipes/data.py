"""The data rules: the sources (dataset_mixer, dataset_mixture or dataset_name), their
splits, the chat template, the length limits and padding-free batches."""

from __future__ import annotations

from collections.abc import Sequence

from mmpo_jax.config_schema import DataConfig
from mmpo_jax.recipes.part import Part, Recipe, config_rule
from mmpo_jax.recipes.reading import as_bool, as_float, as_int, as_str, as_str_list
from mmpo_jax.recipes.table import carry

# The handbook's splits when a recipe with dataset_mixer names none.
HANDBOOK_SPLITS = ["train", "test"]


def data(recipe: Recipe) -> Part:
    """data.* from the recipe's data format (the first of dataset_mixture, dataset_mixer,
    dataset_name it has), chat_template, its lengths, padding_free and data_seed."""
    part = Part(recipe)
    formats = [k for k in ("dataset_mixture", "dataset_mixer", "dataset_name") if part.has(k)]
    for extra in formats[1:]:
        part.skip(extra, part.raw(extra), f"the recipe also gives {formats[0]}, which is used")
    if formats and formats[0] == "dataset_mixture":
        part.add(mixture_new(recipe))
    elif formats and formats[0] == "dataset_mixer":
        part.add(mixer_old(recipe))
    elif formats:
        part.add(dataset_name(recipe))
    part.add(carry(recipe, "chat_template"))
    part.add(lengths(recipe))
    part.add(padding_free(recipe))
    part.add(carry(recipe, "data_seed"))
    return part


def padding_free(recipe: Recipe) -> Part:
    """TRL's `padding_free: true` as data.packing: packed."""
    part = Part(recipe)
    if part.get("padding_free", as_bool):
        # TRL flattens a batch's sequences into one row told apart by position ids; ours
        # packs them into rows told apart by segment ids: neither computes padding between
        # sequences (ours pads only a row's unused tail, to data.pack_length)
        part.set("data.packing", "packed", "padding_free (packed rows: no padding between sequences)")
    return part


def mixer_old(recipe: Recipe) -> Part:
    """alignment-handbook's `dataset_mixer: {id: fraction}` + `dataset_splits`."""
    part = Part(recipe)
    mixer = part.raw("dataset_mixer")
    if not isinstance(mixer, dict) or not mixer:
        part.skip("dataset_mixer", mixer, "expected a mapping {dataset: fraction of its rows}")
        return part
    splits = part.get("dataset_splits", as_str_list, HANDBOOK_SPLITS) or []
    train_splits = [s for s in splits if "train" in s]
    test_splits = [s for s in splits if "test" in s and "train" not in s]
    other = [s for s in splits if s not in train_splits + test_splits]
    if other:
        part.skip("dataset_splits", other, "the handbook uses only *train* / *test* splits")
    mixture: dict[str, float] = {}
    for source, fraction in mixer.items():
        try:
            value = as_float(fraction)
        except ValueError as err:
            part.skip(f"dataset_mixer.{source}", fraction, str(err))
            continue
        if config_rule(f"data.mixture.{source}", value) is not None:
            part.skip(
                f"dataset_mixer.{source}",
                fraction,
                "ours keeps a fraction in (0, 1] of each source (0 keeps no rows; the "
                "handbook cannot take more than all of them either)",
            )
            continue
        mixture[str(source)] = value
    _dataset_configs(part)
    _local_dirs(part, list(map(str, mixer)))
    if mixture and train_splits:
        part.set("data.mixture", mixture, "dataset_mixer")
        part.set("data.split", train_splits[0], "dataset_splits")
        if len(train_splits) > 1:
            part.skip(
                "dataset_splits",
                train_splits[1:],
                f"data.mixture reads one split (data.split: {train_splits[0]}) of every "
                "source; the handbook also concatenates these",
            )
    if test_splits:
        # The handbook does not subsample test splits: every source, whole.
        tests = [str(s) for s in mixer]
        part.set("data.test_files", tests if len(tests) > 1 else tests[0], "dataset_mixer")
        part.set("data.test_split", test_splits[0], "dataset_splits")
        if len(test_splits) > 1:
            part.skip(
                "dataset_splits",
                test_splits[1:],
                f"ours reads one test split (data.test_split: {test_splits[0]})",
            )
    return part


def _dataset_configs(part: Part) -> None:
    configs = part.raw("dataset_configs")
    if configs is None:
        return
    if not isinstance(configs, list) or any(c not in (None, "default") for c in configs):
        part.skip(
            "dataset_configs",
            configs,
            "ours loads each hub dataset's default config; load another config yourself and "
            "name its files in data.mixture",
        )


def _local_dirs(part: Part, sources: Sequence[str]) -> None:
    for source in sources:
        looks_local = source.startswith(("/", ".", "~"))
        if looks_local and not source.lower().endswith((".jsonl", ".json", ".parquet")):
            part.note(
                f"dataset {source} looks like a local directory (the handbook's "
                "load_from_disk); ours reads .jsonl/.json/.parquet files and hub ids"
            )


def mixture_new(recipe: Recipe) -> Part:
    """The handbook's newer `dataset_mixture: {datasets: [...], seed, test_split_size}`."""
    part = Part(recipe)
    value = part.raw("dataset_mixture")
    entries = value.get("datasets") if isinstance(value, dict) else None
    if not isinstance(entries, list) or not entries:
        part.skip("dataset_mixture", value, "expected {datasets: [{id, split, weight}, ...]}")
        return part
    mixture: dict[str, float] = {}
    split: str | None = None
    shuffled = False
    for i, entry in enumerate(entries):
        key = f"dataset_mixture.datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            part.skip(key, entry, "expected a mapping with an id")
            continue
        source, entry_split = entry["id"], str(entry.get("split") or "train")
        if entry.get("config") not in (None, "default"):
            part.skip(key, entry, "ours loads each hub dataset's default config")
            continue
        if split is not None and entry_split != split:
            part.skip(
                key,
                {"id": source, "split": entry_split},
                f"data.mixture reads every source with one split (data.split: {split})",
            )
            continue
        if source in mixture:
            part.skip(key, entry, "this dataset is already in data.mixture")
            continue
        weight = entry.get("weight")
        try:
            fraction = 1.0 if weight is None else as_float(weight)
        except ValueError as err:
            part.skip(key, entry, f"weight: {err}")
            continue
        if config_rule(f"data.mixture.{source}", fraction) is not None:
            part.skip(key, entry, "ours keeps a fraction in (0, 1] of each source")
            continue
        split = entry_split
        mixture[source] = fraction
        shuffled = shuffled or fraction < 1.0
    if mixture:
        part.set("data.mixture", mixture, "dataset_mixture.datasets (id: weight)")
        part.set("data.split", split, "dataset_mixture.datasets (split)")
        _local_dirs(part, list(mixture))
    if shuffled:
        part.note(
            "dataset_mixture weights < 1: the handbook keeps a shuffled subset "
            "(dataset_mixture.seed); ours keeps the first floor(fraction x rows) rows"
        )
    test_size = value.get("test_split_size")
    if test_size not in (None, 0):
        part.skip(
            "dataset_mixture.test_split_size",
            test_size,
            "ours does not split a test set off the training mixture: name test data in "
            "data.test_files (and data.test_split)",
        )
    return part


def dataset_name(recipe: Recipe) -> Part:
    """TRL's script arguments: one hub dataset with a train and a test split."""
    part = Part(recipe)
    name = part.get("dataset_name", as_str)
    if not name:
        return part
    if part.raw("dataset_config") not in (None, "default"):
        part.skip("dataset_config", recipe["dataset_config"], "ours loads the default one")
    part.set("data.train_files", name, "dataset_name")
    train_split = part.get("dataset_train_split", as_str, "train")
    part.set("data.split", train_split, part.origin("dataset_train_split"))
    test_split = part.get("dataset_test_split", as_str, "test")
    strategy = recipe.get("eval_strategy", recipe.get("evaluation_strategy", "no"))
    if strategy != "no":  # TRL's scripts evaluate only then
        part.set("data.test_files", name, "dataset_name")
        part.set("data.test_split", test_split, part.origin("dataset_test_split"))
    return part


def lengths(recipe: Recipe) -> Part:
    """data.max_length and data.max_prompt_length; the completion and truncation keys."""
    part = carry(recipe, "max_length")
    if part.has("max_prompt_length"):
        prompt = part.raw("max_prompt_length")
        if prompt is None:
            part.set("data.max_prompt_length", None, "max_prompt_length")
        else:
            prompt = part.get("max_prompt_length", as_int)
            limit = part.values.get("data.max_length", DataConfig().max_length)
            if prompt is not None and (
                config_rule("data.max_prompt_length", prompt, max_length=limit) is None
            ):
                part.set("data.max_prompt_length", prompt, "max_prompt_length")
            elif prompt is not None:
                part.skip(
                    "max_prompt_length",
                    prompt,
                    f"ours needs 1 <= max_prompt_length < max_length ({limit})",
                )
    completion = part.raw("max_completion_length")
    if completion is not None:
        part.skip(
            "max_completion_length",
            completion,
            "ours limits each completion to data.max_length minus its prompt",
        )
    mode = part.raw("truncation_mode")
    if mode not in (None, "keep_end"):
        part.skip(
            "truncation_mode",
            mode,
            "ours cuts the prompt from the left (TRL's keep_end)",
        )
    return part
