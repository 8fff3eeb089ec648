"""A run's data: the tokenizer, the tokenized train and test splits (`load_data`) and,
with `model.reference=precomputed`, their reference log-prob tables
(`attach_reference_tables`); what `train`, `eval`, `sweep` and `compare --step` read."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from mmpo_jax.config_schema import RunConfig
from mmpo_jax.data.pipeline import load_preference_data
from mmpo_jax.data.tokenizers import tokenizer_of
from mmpo_jax.train.reference_cache import reference_table
from mmpo_jax.train.setup import initial_reference

if TYPE_CHECKING:
    from mmpo_jax.data.pipeline import PreferenceData
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.train.report import Stages
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.train.report import Stages
    from mmpo_jax.train.setup import Evaluator


@dataclass
class RunData:
    """The tokenized splits and, with `model.reference=precomputed`, their reference tables
    (`[rows, 2]` float32 sequence log-probs, chosen and rejected, per example)."""

    tokenizer: Tokenizer
    train: PreferenceData
    test: PreferenceData | None
    train_ref: np.ndarray | None = None
    test_ref: np.ndarray | None = None


def load_data(cfg: RunConfig, log: Callable[[str], None] | None = None) -> RunData:
    """The tokenizer and both splits; `log` hears each stage (tokenizing or the cache)."""
    tokenizer = tokenizer_of(cfg.data, cfg.model.path)
    train = load_preference_data(cfg.data, "train", tokenizer, log=log)
    assert train is not None  # a train split without sources is refused (data.sources.source_specs)
    test = load_preference_data(cfg.data, "test", tokenizer, log=log)
    return RunData(tokenizer=tokenizer, train=train, test=test)


def load_stage(cfg: RunConfig, stages: Stages, say: Callable[[str], None]) -> RunData:
    """`load_data` as a stage of a run's start, timed and summed up (`report.Stages`)."""
    stages.start(f"loading the tokenizer {cfg.data.tokenizer} and the data")
    data = load_data(cfg, log=say)
    stages.end(f"data: {len(data.train)} train pairs" + (f", {len(data.test)} test pairs" if data.test else ""))
    return data


def attach_reference_tables(cfg: RunConfig, run: Evaluator, data: RunData, log: Callable[[str], None],
                            splits: tuple[str, ...] = ("train", "test")) -> None:
    """Mode `precomputed` (`run`'s): the reference tables of `splits` (an evaluation asks for
    the test split only), from the cache (keyed by `cfg`) or one pass of the initial
    reference, loaded for it."""
    if not run.sdef.reference_mode.precomputed:
        return

    # cached: a pass over both splits loads the model once
    load = functools.cache(functools.partial(initial_reference, run))
    if "train" in splits:
        data.train_ref = reference_table(cfg, load, data.train, "train", run.mesh, log)
    if "test" in splits and data.test is not None:
        data.test_ref = reference_table(cfg, load, data.test, "test", run.mesh, log)
