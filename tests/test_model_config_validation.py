"""Model dimensions from a checkpoint (config.json, GGUF metadata) and from `model.init`
are held to one set of rules (`mmpo_jax.config_schema.model_dims_problem`): a bad value is a
one-line UserError naming the file and the key, at once (no JAX traceback, no hang)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mmpo_jax.config import load_config
from mmpo_jax.config_schema import ConfigError
from mmpo_jax.errors import UserError
from mmpo_jax.models import pretrained as C
from mmpo_jax.models.hf_export import export_hf
from mmpo_jax.models.build import build_model
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.options import ModelOptions

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
ARCH = DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    """A complete HF directory of a tiny random model (config.json + model.safetensors)."""
    out = tmp_path_factory.mktemp("good") / "model"
    export_hf(build_model(ARCH, ModelOptions(), seed=0), ARCH, None, out)
    return out


def _with_config(good_dir: Path, tmp_path: Path, **changes) -> Path:
    """A copy of `good_dir` whose config.json has `changes` (None deletes a key)."""
    out = tmp_path / "bad"
    out.mkdir()
    (out / C.SAFETENSORS_FILE).write_bytes((good_dir / C.SAFETENSORS_FILE).read_bytes())
    hf = json.loads((good_dir / C.CONFIG_FILE).read_text())
    for key, value in changes.items():
        if "." in key:  # rope_parameters.rope_theta
            outer, inner = key.split(".")
            hf[outer][inner] = value
        else:
            hf[key] = value
    (out / C.CONFIG_FILE).write_text(json.dumps(hf))
    return out


def test_good_config_still_loads(good_dir):
    model, cfg, _ = C.load_checkpoint(good_dir, ModelOptions())
    assert cfg == ARCH


@pytest.mark.parametrize("key,value,rule", [
    ("hidden_size", -5, "must be a positive integer"),
    ("vocab_size", "abc", "must be a positive integer"),
    ("num_hidden_layers", 1e9, "must be a positive integer"),  # JSON 1e9 is a float
    ("num_hidden_layers", 10**9, "must be <= 1024"),  # would hang building 1e9 layers
    ("intermediate_size", 2**40, "must be <= 1048576"),
    ("vocab_size", 2**30, "must be <= 16777216"),
    ("hidden_size", True, "must be a positive integer"),  # bool is not a size
    ("num_attention_heads", 0, "must be a positive integer"),
    ("num_attention_heads", 2.5, "must be a positive integer"),
    ("num_key_value_heads", 3, "must divide num_attention_heads=4"),
    ("num_key_value_heads", -2, "must be a positive integer"),
    ("head_dim", 7, "must be even"),
    ("head_dim", [8], "must be a positive integer"),
    ("max_position_embeddings", "long", "must be a positive integer"),
    ("rms_norm_eps", "tiny", "must be a positive number"),
    ("rope_theta", -1.0, "must be a positive number"),
    ("rope_parameters.rope_theta", 0, "must be a positive number"),
])
def test_bad_dimension_names_file_and_key_at_once(good_dir, tmp_path, key, value, rule):
    bad = _with_config(good_dir, tmp_path, **{key: value})
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        C.load_checkpoint(bad, ModelOptions())
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert message.startswith(f"'{bad / 'config.json'}': {key}={value!r} {rule}"), message
    assert "\n" not in message


def test_odd_head_size_of_hidden_over_heads(good_dir, tmp_path):
    """No head_dim: hidden_size / num_attention_heads is the head size, which RoPE needs even
    (36 / 4 = 9) and whole; DecoderConfig would floor it silently."""
    bad = _with_config(good_dir, tmp_path, hidden_size=36, head_dim=None)
    with pytest.raises(UserError, match=r"config.json': hidden_size=36 must be a multiple of 2 x "
                                        r"num_attention_heads=4"):
        C.load_checkpoint(bad, ModelOptions())


def test_zero_kv_heads_and_head_dim_still_mean_not_given(good_dir, tmp_path):
    """`from_hf_dict` reads 0 / null num_key_value_heads and head_dim as "derive it"; the
    check does too, so such configs keep loading."""
    ok = _with_config(good_dir, tmp_path, num_key_value_heads=None, head_dim=0)
    hf = json.loads((ok / C.CONFIG_FILE).read_text())
    hf["num_key_value_heads"] = 0
    (ok / C.CONFIG_FILE).write_text(json.dumps(hf))
    C.check_hf_dims(hf, "x")  # no error
    cfg = DecoderConfig.from_hf_dict(hf)
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 8


def test_open_checkpoint_checks_too(good_dir, tmp_path):
    """compare and the AOT check read configs with `open_checkpoint` alone."""
    bad = _with_config(good_dir, tmp_path, num_hidden_layers=5000)
    with pytest.raises(UserError, match="num_hidden_layers=5000 must be <= 1024"):
        C.open_checkpoint(bad)


def _write_gguf(path: Path, **metadata) -> Path:
    """A GGUF with the metadata of a tiny Llama (overridden by `metadata`) and one tensor."""
    import gguf
    import numpy as np

    meta = dict(context_length=128, embedding_length=32, block_count=2, feed_forward_length=64,
                head_count=4, head_count_kv=2, layer_norm_rms_eps=1e-5, vocab_size=97)
    meta.update(metadata)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(meta["context_length"])
    w.add_embedding_length(meta["embedding_length"])
    w.add_block_count(meta["block_count"])
    w.add_feed_forward_length(meta["feed_forward_length"])
    w.add_head_count(meta["head_count"])
    w.add_head_count_kv(meta["head_count_kv"])
    w.add_layer_norm_rms_eps(meta["layer_norm_rms_eps"])
    w.add_vocab_size(meta["vocab_size"])
    w.add_tensor("token_embd.weight", np.zeros((97, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("key,value,shown,rule", [
    ("block_count", 10**9, "llama.block_count", "must be <= 1024"),
    ("embedding_length", 2**20, "llama.embedding_length", "must be <= 131072"),
    ("head_count_kv", 3, "llama.attention.head_count_kv", "must divide num_attention_heads=4"),
])
def test_gguf_metadata_is_checked_with_its_own_key_names(tmp_path, key, value, shown, rule):
    path = _write_gguf(tmp_path / "m.gguf", **{key: value})
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        C.load_checkpoint(path, ModelOptions())
    assert time.monotonic() - start < 5
    assert str(err.value).startswith(f"'{path}': {shown}={value} {rule}"), str(err.value)


def test_gguf_head_count_zero_is_a_user_error(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", head_count=0, head_count_kv=0)
    with pytest.raises(UserError, match=r"m.gguf': GGUF metadata gives an unusable model dimension"):
        C.load_checkpoint(path, ModelOptions())


@pytest.mark.parametrize("override,message", [
    ("model.init.num_hidden_layers=2000", "model.init.num_hidden_layers=2000: must be <= 1024"),
    ("model.init.vocab_size=0", "model.init.vocab_size=0: must be a positive integer"),
    ("model.init.hidden_size=36", "model.init.hidden_size=36: must be a multiple of 2 x num_attention_heads=4"),
    ("model.init.num_key_value_heads=3", "model.init.num_key_value_heads=3: must divide num_attention_heads=4"),
    ("model.init.head_dim=7", "model.init.head_dim=7: must be even"),
    ("model.init.rope_theta=0", "model.init.rope_theta=0.0: must be a positive number"),
])
def test_model_init_follows_the_same_rules(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert message in str(err.value), str(err.value)


def test_model_init_defaults_and_tiny_pass():
    load_config(None)
    load_config(TINY)


# A config.json that lies about something other than a size: each is refused at load, naming
# the key (before: accepted, "no" read as true, a factor of 1e308 an OverflowError later or
# frequencies of 0, a 1-position model that cannot hold a prompt and its answer).
LINEAR = {"rope_type": "linear"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("changes,named", [
    ({"rope_scaling": {**LINEAR, "factor": 0}}, "rope_scaling.factor=0 must be a number > 0 and <= 1024"),
    ({"rope_scaling": {**LINEAR, "factor": -2.0}}, "rope_scaling.factor=-2.0 must be a number > 0"),
    ({"rope_scaling": {**LINEAR, "factor": 1e308}}, "rope_scaling.factor=1e+308 must be a number > 0 and <= 1024"),
    ({"rope_scaling": {"type": "yarn", "factor": "8"}}, "rope_scaling.factor='8' must be a number"),
    ({"rope_parameters": {**LINEAR, "rope_theta": 1e4, "factor": 0.0}}, "rope_parameters.factor=0.0 must be"),
    ({"rope_scaling": {**LLAMA3, "low_freq_factor": 0, "high_freq_factor": 4.0}},
     "rope_scaling.low_freq_factor=0 must be a positive number"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": float("nan")}},
     "rope_scaling.beta_fast=nan must be a number >= 0"),
    ({"sliding_window": 0}, "sliding_window=0 must be a positive integer"),
    ({"sliding_window": -1, "model_type": "mistral"}, "sliding_window=-1 must be a positive integer"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings='no' must be true or false"),
    ({"attention_bias": "false"}, "attention_bias='false' must be true or false"),
    ({"torch_dtype": "evil"}, "torch_dtype='evil' is not a dtype transformers knows"),
    ({"dtype": 16}, "dtype=16 is not a dtype transformers knows"),
    ({"max_position_embeddings": 1}, "max_position_embeddings=1 must be >= 2 (a sequence of a prompt token"),
])
def test_a_hostile_config_value_is_refused_naming_the_key(good_dir, tmp_path, changes, named):
    bad = _with_config(good_dir, tmp_path, **changes)
    with pytest.raises(UserError) as err:
        C.load_checkpoint(bad, ModelOptions())
    message = str(err.value)
    assert named in message and str(bad) in message and "\n" not in message, message


@pytest.mark.parametrize("changes", [
    {"rope_scaling": {**LINEAR, "factor": 2.0}},
    {"rope_scaling": {**LLAMA3, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
    {"rope_scaling": {**LLAMA3, "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0}},  # Llama 4's
    {"rope_scaling": {**LINEAR, "rope_type": "default", "factor": 0}},  # ignored by the default RoPE
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 1024}},
    {"sliding_window": None, "torch_dtype": "bfloat16", "dtype": "torch.float16"},
    {"tie_word_embeddings": False, "max_position_embeddings": 2},
])
def test_sane_values_next_to_them_still_load(good_dir, tmp_path, changes):
    """Negative control: real configs' values, and the edges of the rules, load."""
    ok = _with_config(good_dir, tmp_path, **changes)
    C.load_checkpoint(ok, ModelOptions())


def test_model_init_max_position_embeddings_of_one_is_refused_too():
    with pytest.raises(ConfigError, match="model.init.max_position_embeddings=1: must be >= 2"):
        load_config(TINY, ["model.init.max_position_embeddings=1"])
