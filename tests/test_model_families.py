"""Qwen3 with YaRN RoPE, Gemma 2 and Gemma 3 against transformers' PyTorch models, float32.

As tests/test_model_llama.py for the Llama family: random tiny configs with the edge
cases that matter (a window shorter than the sequences, soft-caps that bite, head_dim
!= hidden / heads, query_pre_attn_scalar != head_dim, tied and untied embeddings, the
alternating and 5:1 layer patterns under scanned layers, Gemma 3's two RoPE bases),
per-token log-probs within 1e-5 and every gradient within 1e-4 relative, in both weight
directions; YaRN's frequencies against transformers' own rope init; Gemma 3's text
tower out of a multimodal checkpoint in both of transformers' layouts; generation with
the KV cache against the uncached forward and transformers' greedy `generate`.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_parity import (  # noqa: E402
    MIN_GAP,
    TOKEN_TOL,
    batch,
    check_our_weights_into_torch,
    check_torch_weights_into_ours,
    hf_model,
    load_ours_into_torch,
    random_hf_weights,
    randomize_torch,
    reference_greedy,
    target_mask,
    torch_token_logps,
)

from mmpo_jax.errors import UserError  # noqa: E402
from mmpo_jax.eval.generate import GenerationConfig, generate, left_pad  # noqa: E402
from mmpo_jax.logprobs import model_token_logps  # noqa: E402
from mmpo_jax.models.build import build_model  # noqa: E402
from mmpo_jax.models.pretrained import load_checkpoint  # noqa: E402
from mmpo_jax.models.hf_weights import iter_hf_weights  # noqa: E402
from mmpo_jax.models.decoder_config import DecoderConfig  # noqa: E402
from mmpo_jax.models.options import ModelOptions  # noqa: E402
from mmpo_jax.models.rope import inv_freq  # noqa: E402

_BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128)
S, F = "sliding_attention", "full_attention"
CONFIGS = {
    # alternating window-4 / full layers, head_dim 24 != 64 / 4, query_pre_attn_scalar 32,
    # both soft-caps low enough to bite, tied embeddings
    "gemma2": DecoderConfig(**_BASE, num_hidden_layers=4, model_type="gemma2", head_dim=24, sliding_window=4,
                          layer_types=(S, F, S, F), query_pre_attn_scalar=32, attn_logit_softcapping=2.0,
                          final_logit_softcapping=8.0, tie_word_embeddings=True),
    # q/k norms, the 5:1 pattern over 7 layers (layer 6 full, 7 sliding again), sliding
    # layers on base 1e4, full ones on 1e6 with linear x4 scaling, untied embeddings
    "gemma3": DecoderConfig(**_BASE, num_hidden_layers=7, model_type="gemma3", sliding_window=4,
                          query_pre_attn_scalar=16, rope_theta=1e6, rope_local_base_freq=1e4,
                          rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=False),
    # YaRN over a short original context, so positions 0..15 reach its interpolated band
    "qwen3_yarn": DecoderConfig(**_BASE, num_hidden_layers=2, model_type="qwen3", head_dim=32, rope_theta=1e6,
                              rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 8}),
}


# --------------------------------------------------------------------------- #
# config
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "params",
    [
        {"factor": 4.0, "original_max_position_embeddings": 32},
        {"factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2},
        {"factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 1.3, "truncate": False},
        {"factor": 16.0, "original_max_position_embeddings": 16, "mscale": 0.7, "mscale_all_dim": 1.0},
        {"factor": 4.0},  # original_max_position_embeddings from max_position_embeddings
    ],
)
def test_yarn_frequencies_and_scale_match_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hc = transformers.Qwen3Config(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=128,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, **params})
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hc, "cpu")
    got, scale = inv_freq(64, 1e6, {"rope_type": "yarn", **params}, 128)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    assert scale == pytest.approx(want_scale, rel=1e-12)
    assert not np.allclose(got, inv_freq(64, 1e6, None, 128)[0])  # YaRN changed something


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_config_round_trip(name):
    """to_hf_dict -> transformers' config class -> its to_dict -> from_hf_dict is the same architecture."""
    cfg = CONFIGS[name]
    hc = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    assert type(hc).__name__ == {"gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig",
                                 "qwen3_yarn": "Qwen3Config"}[name]
    assert DecoderConfig.from_hf_dict(hc.to_dict()) == cfg


def test_gemma_configs_as_transformers_4_wrote_them():
    """Keys older files use: rope_local_base_freq and rope_scaling at the top (Gemma 3),
    sliding_window_pattern instead of layer_types, and family defaults for keys left out."""
    g3 = DecoderConfig.from_hf_dict({**_BASE, "num_hidden_layers": 8, "model_type": "gemma3_text", "head_dim": 16,
                                   "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window": 512,
                                   "sliding_window_pattern": 4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert g3.layer_types == (S, S, S, F, S, S, S, F) and g3.rope_local_base_freq == 1e4
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 8.0} and g3.tie_word_embeddings
    assert g3.query_pre_attn_scalar == 256 and g3.attn_logit_softcapping is None and g3.hidden_act == "gelu_pytorch_tanh"
    g2 = DecoderConfig.from_hf_dict({**_BASE, "num_hidden_layers": 3, "model_type": "gemma2", "head_dim": 16})
    assert g2.layer_types == (S, F, S) and g2.sliding_window == 4096
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"model_type": "gemma2", "hidden_activation": "gelu"}, "gelu"),
        ({"model_type": "gemma2", "layer_types": ["sliding_attention", "chunked_attention"]}, "chunked_attention"),
        ({"model_type": "gemma2", "layer_types": ["sliding_attention"]}, "lists 1 layers"),
        ({"model_type": "gemma3_text", "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}}, "sliding layers"),
        ({"model_type": "gemma3", "vision_config": {}}, "text_config"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn' needs factor"),
    ],
)
def test_unsupported_family_options_are_named(change, needle):
    d = {**_BASE, "num_hidden_layers": 2, "head_dim": 16, **change}
    with pytest.raises(UserError, match=needle):
        DecoderConfig.from_hf_dict(d)


# --------------------------------------------------------------------------- #
# against transformers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_weights_into_ours(name):
    """torch's random weights -> build_model (scanned layers): log-probs and gradients."""
    diff, worst = check_torch_weights_into_ours(CONFIGS[name], seed=zlib.crc32(name.encode()) % 1000)
    print(f"{name}: max |dlogp| {diff:.2e}, max rel grad diff {worst:.2e}")


def test_gemma2_soft_caps_and_window_bite():
    """Negative controls for the gemma2 case: transformers' own model without either
    soft-cap, or with a window wider than the sequence, gives other log-probs, so the
    parity above checks each of them."""
    cfg = CONFIGS["gemma2"]
    tmodel = hf_model(cfg)
    randomize_torch(tmodel, seed=zlib.crc32(b"gemma2") % 1000)
    ids, mask = batch(cfg.vocab_size)
    tm = target_mask(mask).astype(bool)
    with torch.no_grad():
        base = torch_token_logps(tmodel, ids, mask).numpy()
        for key, value in [("final_logit_softcapping", None), ("attn_logit_softcapping", None),
                           ("sliding_window", 64)]:
            old = _set_option(tmodel, key, value)
            changed = torch_token_logps(tmodel, ids, mask).numpy()
            assert np.max(np.abs(changed - base)[tm]) > 1e-2, key
            _set_option(tmodel, key, old)


def _set_option(tmodel, key: str, value):
    """Sets `key` on transformers' Gemma 2 config and on the layers that copied it at
    build (the attention soft-cap; the sliding layers' window); returns the old value."""
    old = getattr(tmodel.config, key)
    setattr(tmodel.config, key, value)
    for layer in tmodel.model.layers:
        if key == "attn_logit_softcapping":
            layer.self_attn.attn_logit_softcapping = value
        if key == "sliding_window" and layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = value
    return old


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_our_weights_into_torch(name):
    """Our random weights (unscanned layers, remat) -> iter_hf_weights -> transformers'
    load_state_dict(strict): log-probs and gradients."""
    diff, worst = check_our_weights_into_torch(CONFIGS[name], 0.25, remat="full")
    print(f"ours->torch {name}: max |dlogp| {diff:.2e}, max rel grad diff {worst:.2e}")


def _save_multimodal(tmp: Path, text: DecoderConfig, modern_names: bool) -> tuple[Path, dict]:
    """A tiny Gemma3ForConditionalGeneration saved by transformers (its vision tower
    random), its text weights large; with `modern_names` the tensors renamed to
    transformers 5's in-memory layout (`model.language_model.*`)."""
    from safetensors.numpy import load_file, save_file

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    hc = transformers.Gemma3Config(text_config=text.to_hf_dict(), vision_config=vision, mm_tokens_per_image=4,
                                   image_token_index=95, boi_token_index=93, eoi_token_index=94)
    model = transformers.Gemma3ForConditionalGeneration(hc).eval()
    randomize_torch(model.model.language_model, seed=7)
    model.save_pretrained(tmp)
    weights = load_file(tmp / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in weights)  # transformers 4's layout on disk
    if modern_names:
        renamed = {("model.language_model." + k[len("language_model.model."):]
                    if k.startswith("language_model.model.") else k): v for k, v in weights.items()}
        save_file(renamed, str(tmp / "model.safetensors"))
    return tmp, model


@pytest.mark.parametrize("modern_names", [False, True])
def test_gemma3_text_tower_of_a_multimodal_checkpoint(tmp_path, modern_names):
    text = DecoderConfig(**_BASE, num_hidden_layers=2, model_type="gemma3", head_dim=16, sliding_window=4,
                       query_pre_attn_scalar=16, tie_word_embeddings=True)
    path, tmodel = _save_multimodal(tmp_path, text, modern_names)
    assert json.loads((path / "config.json").read_text())["model_type"] == "gemma3"
    model, cfg, _ = load_checkpoint(path, with_tokenizer=False)
    assert cfg == dataclasses.replace(text, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                      pad_token_id=cfg.pad_token_id)
    ids, mask = batch(text.vocab_size)
    with torch.no_grad():
        lp = torch_token_logps(tmodel, ids, mask).numpy()[:, 1:]
    ours = np.asarray(model_token_logps(model, jnp.asarray(ids, jnp.int32), chunk=8))[:, 1:]
    tm = target_mask(mask)[:, 1:].astype(bool)
    assert float(np.max(np.abs(ours - lp)[tm])) < TOKEN_TOL
    if modern_names:
        return
    # exported, the text tower is a Gemma3ForCausalLM that transformers loads as such
    from mmpo_jax.models.hf_export import export_hf

    out = export_hf(model, cfg, None, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        again = torch_token_logps(back, ids, mask).numpy()[:, 1:]
    assert float(np.max(np.abs(again - lp)[tm])) < TOKEN_TOL


# --------------------------------------------------------------------------- #
# generation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name,scan", [("gemma2", True), ("gemma3", False)])
def test_cached_generation_matches_uncached_and_transformers(name, scan):
    """Left-padded prompts longer than the window: the KV cache path (each layer its
    own window and RoPE, the soft-caps) gives the uncached recomputation's greedy tokens
    and transformers' `generate(do_sample=False)`'s."""
    cfg = CONFIGS[name]
    weights = random_hf_weights(cfg, seed=13)
    model = build_model(cfg, ModelOptions(scan_layers=scan), get_tensor=weights.__getitem__)
    rng = np.random.default_rng(12)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in (9, 3)]
    n_new = 8
    ref, gap = reference_greedy(model, prompts, n_new, width=32)
    assert gap > MIN_GAP
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=n_new, eos_ids=())).tokens
    np.testing.assert_array_equal(ours, ref)

    tmodel = hf_model(cfg)
    load_ours_into_torch(model, tmodel)
    ids, pad = left_pad(prompts, 0)
    mask = (np.arange(ids.shape[1])[None] >= pad[:, None]).astype(np.int64)
    with torch.no_grad():
        out = tmodel.generate(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                              do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0,
                              eos_token_id=None)
    np.testing.assert_array_equal(out[:, ids.shape[1]:].numpy(), ours)
    assert len({tuple(r) for r in ours}) == len(prompts) and all(len(set(r)) > 2 for r in ours), ours


def test_iter_hf_weights_names_gemma_norms():
    names = [n for n, _ in iter_hf_weights(build_model(CONFIGS["gemma3"], ModelOptions(scan_layers=True)))]
    layer0 = sorted(n.split("layers.0.")[1] for n in names if "layers.0." in n)
    assert layer0 == sorted(["input_layernorm.weight", "post_attention_layernorm.weight",
                             "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
                             "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                             "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                             "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"])


def test_attention_auto_is_xla_with_an_attention_soft_cap():
    """jax.nn.dot_product_attention takes no soft-cap: auto settles on xla for Gemma 2
    where it would take cuDNN otherwise, and an explicit cudnn stops at build."""
    gpu_bf16 = ModelOptions(backend="gpu", compute_dtype="bfloat16")
    assert gpu_bf16.attention_implementation(64) == "cudnn"
    assert gpu_bf16.attention_implementation(64, soft_cap=True) == "xla"
    with pytest.raises(UserError, match="soft-cap"):
        build_model(CONFIGS["gemma2"], ModelOptions(attention="cudnn"))


# --------------------------------------------------------------------------- #
# published config.json files (as on the hub) and random-init configs
# --------------------------------------------------------------------------- #
REAL_CONFIGS = {
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "gemma-2-2b": {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
        "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2",
        "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": 256000,
    },
    "gemma-3-1b-it": {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 262144,
    },
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs_match_transformers_tensors_and_layers(name):
    """Published config.json files: our tensors and shapes are transformers' model's
    (built on the meta device), and so are its layers' windows and RoPE bases."""
    from mmpo_jax.models.hf_weights import hf_weight_shapes

    cfg = DecoderConfig.from_hf_dict(REAL_CONFIGS[name])
    hc = transformers.AutoConfig.for_model(**REAL_CONFIGS[name])
    with torch.device("meta"):
        tmodel = transformers.AutoModelForCausalLM.from_config(hc)
    theirs = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    if cfg.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert hf_weight_shapes(cfg) == theirs
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in tmodel.model.layers]
    assert [cfg.sliding_window if s else None for s in cfg.layer_sliding] == windows
    assert cfg.attention_scale == pytest.approx(tmodel.model.layers[0].self_attn.scaling)


def test_model_init_builds_each_family():
    """`model.init.model_type` picks the family of a random init; its defaults are the family's."""
    from mmpo_jax.config import ConfigError, load_config
    from mmpo_jax.models.decoder_config import model_config_from_init

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    g3 = model_config_from_init(load_config(tiny, ["model.init.model_type=gemma3", "model.init.num_hidden_layers=6",
                                                   "model.init.sliding_window=8"]).model.init)
    assert g3.model_type == "gemma3" and g3.qk_norm and g3.layer_types == (S,) * 5 + (F,)
    assert g3.sliding_window == 8 and g3.hidden_act == "gelu_pytorch_tanh" and g3.rope_local_base_freq == 1e4
    q3 = model_config_from_init(load_config(tiny, ["model.init.model_type=qwen3", "model.init.attention_bias=true"]
                                            ).model.init)
    assert q3.model_type == "qwen3" and q3.o_bias and q3.sliding_window is None
    with pytest.raises(ConfigError, match="model.init.model_type='gpt2'.*gemma3"):
        load_config(tiny, ["model.init.model_type=gpt2"])
