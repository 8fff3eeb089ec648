"""`mmpo_jax.config_settle` is the one place defaults that depend on other keys and `auto`
resolve: what the config loader returns is settled, what was written is what is checked."""

from __future__ import annotations

import dataclasses

import pytest

from mmpo_jax import config_schema
from mmpo_jax.config import load_config
from mmpo_jax.config_schema import ConfigError, LossConfig
from mmpo_jax.config_settle import settle_loss, settled_compute_dtype


def test_a_loaded_config_is_settled():
    cfg = load_config(None)
    assert (cfg.loss.beta, cfg.loss.average_logps, cfg.loss.gamma) == (0.1, False, 1.0)
    assert cfg.model.reference == "separate" and cfg.data.tokenizer == "builtin:tiny"
    assert cfg.train.max_steps == 1000 and cfg.data.pack_length is None
    assert cfg.model.compute_dtype == "auto"  # settled per backend by what reads it
    packed = load_config(None, ["data.packing=packed", "data.max_length=64", "data.max_prompt_length=32"])
    assert packed.data.pack_length == 128
    lora = load_config(None, ["model.lora.rank=4", "loss.name=cpo", "loss.loss_type=ipo"])
    assert lora.model.reference == "none" and lora.loss.average_logps is True and lora.loss.gamma == 0.5
    assert load_config(None, ["model.lora.rank=4"]).model.reference == "lora_base"


def test_what_was_written_is_checked_before_it_is_settled():
    # auto with another checkpoint is not an explicit mode the path is unused by
    cfg = load_config(None, ["loss.name=simpo", "model.reference_path=/some/model"])
    assert cfg.model.reference == "none"
    with pytest.raises(ConfigError, match="model.reference_path.*not none"):
        load_config(None, ["loss.name=simpo", "model.reference=none", "model.reference_path=/some/model"])
    with pytest.raises(ConfigError, match="needs LoRA: set model.lora.rank > 0"):
        load_config(None, ["model.reference=lora_base"])


def test_settle_loss_gives_each_loss_its_own_defaults():
    assert settle_loss(LossConfig(name="simpo")).beta == 2.0
    assert settle_loss(LossConfig(name="simpo", beta=3.0)).beta == 3.0
    assert settle_loss(LossConfig(name="orpo")).average_logps is True


def test_compute_dtype_is_settled_for_a_named_backend():
    assert [settled_compute_dtype("auto", b) for b in ("cpu", "gpu", "tpu")] == ["float32", "bfloat16", "bfloat16"]
    assert settled_compute_dtype("float32", "tpu") == "float32"


def test_no_section_settles_itself():
    """The sections only declare and check; no `settled` method is left to drift from `settle`."""
    sections = [getattr(config_schema, f.type) if isinstance(f.type, str) else f.type
                for f in dataclasses.fields(config_schema.RunConfig)]
    assert sections and not any(hasattr(section, "settled") for section in sections)
