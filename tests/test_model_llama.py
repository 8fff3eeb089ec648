"""The Llama-family model against transformers' PyTorch models, float32.

Random tiny configs of each supported variant; weights drawn large so the
next-token distributions are far from uniform; right-padded batches. Per-token
log-probs within 1e-5 of transformers, gradients of the summed sequence log-probs
within 1e-4 (max|g_ours - g_torch| / max|g_torch| per tensor). Both directions of the
weight mapping are exercised: torch's random weights -> `build_model(get_tensor=)`,
and our random weights -> `iter_hf_weights` -> torch's `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from mmpo_jax.errors import UserError
from mmpo_jax.logprobs import model_token_logps
from mmpo_jax.models.build import build_model
from mmpo_jax.models.hf_weights import hf_weight_names, hf_weight_shapes, iter_hf_weights
from mmpo_jax.models.decoder import Decoder
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.options import ModelOptions

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_parity import (  # noqa: E402
    batch,
    check_our_weights_into_torch,
    check_torch_weights_into_ours,
    hf_model,
    max_rel,
    our_logps_and_grads,
    randomize_torch,
    target_mask,
    torch_state,
)

_BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so the 3 frequency bands (kept, smoothed, divided) all occur at head_dim 16
    "original_max_position_embeddings": 64,
}
# Each variant the issue names, two to a config where they are independent (every
# config costs a compile of the forward+backward):
CONFIGS = {
    "llama": DecoderConfig(**_BASE, tie_word_embeddings=True),
    "llama3_rope": DecoderConfig(
        **_BASE, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE
    ),
    "untied_linear_rope": DecoderConfig(
        **_BASE, tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 4.0}
    ),
    "qwen2_bias": DecoderConfig(
        **_BASE, model_type="qwen2", attention_bias=True, rope_theta=1e6, tie_word_embeddings=False
    ),
    "mistral_window": DecoderConfig(**_BASE, model_type="mistral", sliding_window=4),
    # head_dim 24 != 64 / 4; and transformers' Llama attention_bias (q/k/v and o biases)
    "head_dim_24_bias": DecoderConfig(
        **{**_BASE, "num_key_value_heads": 4}, head_dim=24, attention_bias=True
    ),
    "mqa": DecoderConfig(**{**_BASE, "num_key_value_heads": 1, "num_hidden_layers": 3}),
    # Qwen3: q/k norms over head_dim, head_dim 24 != 64 / 4, its q/k/v and o biases
    "qwen3_qk_norm": DecoderConfig(
        **_BASE, model_type="qwen3", head_dim=24, attention_bias=True, rope_theta=1e6
    ),
}


# --------------------------------------------------------------------------- #
# config
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_config_round_trip(name):
    cfg = CONFIGS[name]
    d = cfg.to_hf_dict()
    assert DecoderConfig.from_hf_dict(d) == cfg
    hc = transformers.AutoConfig.for_model(**d)
    assert hc.model_type == cfg.model_type
    assert DecoderConfig.from_hf_dict(hc.to_dict()) == cfg


def test_hf_names_match_transformers():
    for cfg in CONFIGS.values():
        tmodel = hf_model(cfg)
        theirs = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
        if cfg.tie_word_embeddings:
            theirs.pop("lm_head.weight", None)
        assert hf_weight_shapes(cfg) == theirs
        assert hf_weight_names(cfg) == list(hf_weight_shapes(cfg))


def test_from_hf_dict_styles():
    t4 = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    t5 = {k: v for k, v in t4.items() if k not in ("rope_theta", "rope_scaling")}
    t5["rope_parameters"] = {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}
    a, b = DecoderConfig.from_hf_dict(t4), DecoderConfig.from_hf_dict(t5)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert a.head_dim == 8 and a.num_key_value_heads == 4
    plain = DecoderConfig.from_hf_dict({**t5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e4
    qwen = DecoderConfig.from_hf_dict({**t5, "model_type": "qwen2", "use_sliding_window": False,
                                     "sliding_window": 4096})
    assert qwen.attention_bias and qwen.sliding_window is None
    mistral = DecoderConfig.from_hf_dict({**t5, "model_type": "mistral", "sliding_window": 4096})
    assert mistral.sliding_window == 4096
    qwen3 = DecoderConfig.from_hf_dict({**t5, "model_type": "qwen3", "head_dim": 16, "use_sliding_window": False,
                                      "sliding_window": 4096})
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.head_dim == 16 and qwen3.sliding_window is None
    assert not qwen.qk_norm and not mistral.qk_norm


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"model_type": "gpt2"}, "gpt2"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}}, "longrope"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_from_hf_dict_unsupported(change, needle):
    d = {**CONFIGS["llama"].to_hf_dict(), **change}
    d.pop("rope_scaling") if "rope_parameters" in change else None
    if "rope_scaling" in change:
        d.pop("rope_parameters")
    with pytest.raises(UserError, match=needle):
        DecoderConfig.from_hf_dict(d)


# --------------------------------------------------------------------------- #
# against transformers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_weights_into_ours(name):
    """torch's random weights -> build_model(get_tensor=state_dict): log-probs and grads."""
    diff, worst = check_torch_weights_into_ours(CONFIGS[name], seed=zlib.crc32(name.encode()) % 1000)
    print(f"{name}: max |dlogp| {diff:.2e}, max rel grad diff {worst:.2e}")


@pytest.mark.parametrize("name,scale", [("llama", 0.15), ("qwen2_bias", 0.25), ("qwen3_qk_norm", 0.25)])
def test_our_weights_into_torch(name, scale):
    """Our random weights -> iter_hf_weights -> transformers' load_state_dict(strict)."""
    diff, worst = check_our_weights_into_torch(CONFIGS[name], scale)
    print(f"ours->torch {name}: max |dlogp| {diff:.2e}, max rel grad diff {worst:.2e}")


def test_weight_round_trip_is_exact():
    cfg = CONFIGS["qwen2_bias"]
    tmodel = hf_model(cfg)
    randomize_torch(tmodel)
    state = torch_state(tmodel)
    for scan in (True, False):
        model = build_model(cfg, ModelOptions(scan_layers=scan), get_tensor=state.__getitem__)
        back = dict(iter_hf_weights(model))
        assert list(back) == hf_weight_names(cfg)
        for k, v in back.items():
            assert v.dtype == np.float32
            np.testing.assert_array_equal(v, state[k])


# --------------------------------------------------------------------------- #
# options: scan, remat, dtypes, dropout
# --------------------------------------------------------------------------- #
def _from_state(cfg, state, **options):
    return build_model(cfg, ModelOptions(**options), get_tensor=state.__getitem__)


@pytest.mark.slow
def test_scan_and_remat_give_the_same_numbers():
    cfg = CONFIGS["mqa"]  # 3 layers
    tmodel = hf_model(cfg)
    randomize_torch(tmodel, seed=5)
    state = torch_state(tmodel)
    ids, mask = batch(cfg.vocab_size, seed=3)
    ref_lp, ref_g = our_logps_and_grads(_from_state(cfg, state, scan_layers=False, remat="none"), ids, mask)
    for scan, remat in ((True, "none"), (True, "full"), (True, "dots"), (False, "full")):
        lp, g = our_logps_and_grads(_from_state(cfg, state, scan_layers=scan, remat=remat), ids, mask)
        np.testing.assert_allclose(lp, ref_lp, rtol=1e-6, atol=1e-6)
        for k in ref_g:
            assert max_rel(g[k], ref_g[k]) < 1e-5, (scan, remat, k)


def test_scanned_params_are_stacked_with_a_layers_axis():
    cfg = CONFIGS["llama"]

    def abstract(scan):
        return nnx.eval_shape(lambda: Decoder(cfg, ModelOptions(scan_layers=scan), rngs=nnx.Rngs(0)))

    model = abstract(True)
    q = model.layers.self_attn.q_kernel
    assert q.shape == (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    flat = abstract(False)
    assert flat.layers[0].self_attn.q_kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")


def test_bfloat16_params_and_compute_run_close():
    cfg = CONFIGS["llama"]
    tmodel = hf_model(cfg)
    randomize_torch(tmodel)
    state = torch_state(tmodel)
    ids, mask = batch(cfg.vocab_size)
    ref = np.asarray(nnx.jit(model_token_logps)(_from_state(cfg, state), jnp.asarray(ids, jnp.int32)))
    m16 = _from_state(cfg, state, param_dtype="bfloat16", compute_dtype="bfloat16")
    assert m16.embed_tokens.dtype == jnp.bfloat16
    h, lp = nnx.jit(lambda m, i: (m(i), model_token_logps(m, i)))(m16, jnp.asarray(ids, jnp.int32))
    assert h.dtype == jnp.bfloat16
    assert lp.dtype == jnp.float32
    tm = target_mask(mask).astype(bool)
    # bf16 is coarse; this only checks nothing is wired wrongly.
    assert np.median(np.abs(np.asarray(lp) - ref)[tm]) < 0.5


def test_dropout_only_with_a_key():
    cfg = CONFIGS["llama"]
    ids = jnp.asarray(batch(cfg.vocab_size)[0], jnp.int32)
    run = nnx.jit(lambda m, i, k: (m(i), m(i, dropout_key=k)))
    model = build_model(cfg, ModelOptions(dropout=0.5), seed=0)
    base, dropped = run(model, ids, jax.random.key(0))
    assert not np.allclose(np.asarray(dropped), np.asarray(base))
    nodrop = build_model(cfg, ModelOptions(dropout=0.0), seed=0)
    base0, same = run(nodrop, ids, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(base0), np.asarray(base))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(base))


def test_attention_choice():
    o = ModelOptions(attention="auto", compute_dtype="bfloat16")
    assert o.attention_implementation(64) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert ModelOptions(attention="auto", compute_dtype="float32").attention_implementation(64) == "xla"
    assert ModelOptions(attention="xla").attention_implementation(64) == "xla"
    with pytest.raises(UserError, match="flash"):
        ModelOptions(attention="flash")
    with pytest.raises(UserError, match="none, full, dots"):
        ModelOptions(remat="some")


def test_options_from_config():
    from mmpo_jax.config import load_config

    cfg = load_config(None, ["model.param_dtype=bfloat16", "model.compute_dtype=float32",
                             "model.remat=dots", "model.scan_layers=false"])
    o = ModelOptions.from_config(cfg.model)
    assert o.param_dtype == jnp.bfloat16 and o.compute_dtype == jnp.float32
    assert o.remat == "dots" and o.scan_layers is False and o.attention == "auto"


def test_auto_is_settled_for_a_named_backend():
    """`auto` resolves as it would on the named backend, whatever this machine is (what an
    ahead-of-time compile for another backend needs): bfloat16 compute off CPU, cuDNN
    attention only on a GPU, splash only on a TPU."""
    from mmpo_jax.config import load_config

    model = load_config(None).model  # compute_dtype auto, attention auto
    expected = {"cpu": (jnp.float32, "xla"), "gpu": (jnp.bfloat16, "cudnn"), "tpu": (jnp.bfloat16, "splash")}
    for backend, (compute, attention) in expected.items():
        o = ModelOptions.from_config(model, backend)
        assert (o.compute_dtype, o.attention_implementation(64)) == (compute, attention), backend
    assert ModelOptions.from_config(model, "gpu").attention_implementation(256) == "xla"  # cuDNN: head_dim <= 128


# --------------------------------------------------------------------------- #
# loading errors
# --------------------------------------------------------------------------- #
def test_missing_and_misshapen_tensors_are_named():
    cfg = CONFIGS["untied_linear_rope"]
    tmodel = hf_model(cfg)
    state = torch_state(tmodel)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\[112, 64\]"):
        build_model(cfg, ModelOptions(), get_tensor=missing.__getitem__)
    bad = dict(state)
    bad["lm_head.weight"] = bad["lm_head.weight"][:, :10]
    with pytest.raises(UserError, match=r"lm_head\.weight.*\[96, 10\].*\[96, 64\]"):
        build_model(cfg, ModelOptions(), get_tensor=bad.__getitem__)


def test_loaded_values_are_exact_and_on_the_requested_dtype():
    cfg = CONFIGS["llama"]
    state = torch_state(hf_model(cfg))
    model = build_model(cfg, ModelOptions(param_dtype="bfloat16"), get_tensor=state.__getitem__)
    emb = model.embed_tokens[...]
    assert emb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(emb), state["model.embed_tokens.weight"].astype(jnp.bfloat16)
    )


# --------------------------------------------------------------------------- #
# sharding rules on 8 simulated devices
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_params_sharded_by_the_rules_and_forward_matches():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mmpo_jax.config_schema import MeshConfig
    from mmpo_jax.sharding import BATCH_AXES, make_mesh, model_partition_specs

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = dataclasses.replace(CONFIGS["mqa"], tie_word_embeddings=False)
    tmodel = hf_model(cfg)
    randomize_torch(tmodel, seed=7)
    state = torch_state(tmodel)
    ids = jnp.asarray(batch(cfg.vocab_size, lengths=(16, 12, 9, 5))[0], jnp.int32)

    ids_np, mask = batch(cfg.vocab_size, lengths=(16, 12, 9, 5))
    single = build_model(cfg, ModelOptions(), get_tensor=state.__getitem__)
    want, want_g = our_logps_and_grads(single, ids_np, mask)

    model = build_model(cfg, ModelOptions(), mesh=mesh, get_tensor=state.__getitem__)
    expected = {
        ("embed_tokens",): P("tensor", "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
        ("norm", "weight"): P(None),
        ("layers", "input_layernorm", "weight"): P(None, None),
        ("layers", "post_attention_layernorm", "weight"): P(None, None),
        ("layers", "self_attn", "q_kernel"): P(None, "fsdp", "tensor", None),
        # one kv head: tensor=2 cannot split it, so it stays replicated over tensor
        ("layers", "self_attn", "k_kernel"): P(None, "fsdp", None, None),
        ("layers", "self_attn", "v_kernel"): P(None, "fsdp", None, None),
        ("layers", "self_attn", "o_kernel"): P(None, "tensor", None, "fsdp"),
        ("layers", "mlp", "gate_kernel"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "up_kernel"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "down_kernel"): P(None, "tensor", "fsdp"),
    }
    specs = dict(nnx.to_flat_state(model_partition_specs(nnx.state(model, nnx.Param), mesh)))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert set(params) == set(expected)
    for path, spec in expected.items():
        assert specs[path].get_value() == spec, (path, specs[path].get_value())
        arr = params[path].get_value()
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), path
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(dict(nnx.to_flat_state(
            nnx.state(single, nnx.Param)))[path].get_value()))

    sharded_ids = jax.device_put(ids, NamedSharding(mesh, P(BATCH_AXES, None)))
    got = np.asarray(nnx.jit(model_token_logps)(model, sharded_ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # forward + backward on the mesh: the single-device gradients
    got, got_g = our_logps_and_grads(model, ids_np, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name, g in want_g.items():
        assert max_rel(got_g[name], g) < 1e-5, name

    # a random init lands on the same shardings, with the single-device values
    rand = build_model(cfg, ModelOptions(), mesh=mesh, seed=1)
    rand1 = build_model(cfg, ModelOptions(), seed=1)
    for path, var in nnx.to_flat_state(nnx.state(rand, nnx.Param)):
        arr = var.get_value()
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, expected[path]), arr.ndim), path
        # same random stream (jit vs eager may round the normal's transform 1 ulp apart)
        np.testing.assert_allclose(
            np.asarray(arr),
            np.asarray(dict(nnx.to_flat_state(nnx.state(rand1, nnx.Param)))[path].get_value()),
            rtol=1e-6, atol=1e-9,
        )


def test_logical_rules_drop_axes_that_do_not_divide():
    from jax.sharding import PartitionSpec as P

    from mmpo_jax.config_schema import MeshConfig
    from mmpo_jax.sharding import logical_to_spec, make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 simulated devices of tests/conftest.py")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", "tensor", None)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P("fsdp", None, None)
    assert logical_to_spec(("vocab", "embed"), (97, 64), mesh) == P(None, "fsdp")
    assert logical_to_spec(("batch", "seq", "act_embed"), (8, 4, 64), mesh) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("batch", "seq"), (2, 4), mesh) == P("data", None)
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("nonsense",))


# --------------------------------------------------------------------------- #
# real checkpoints' config.json files (transformers 4 style, as published)
# --------------------------------------------------------------------------- #
REAL_CONFIGS = {
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 128256,
    },
    "SmolLM2-135M": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
        "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
        "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
        "vocab_size": 49152,
    },
    "Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645,
        "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "vocab_size": 32000,
    },
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs_parse_and_match_transformers_shapes(name):
    """Published config.json files: parsed, and our (abstract) model holds exactly the
    tensors, shapes and parameter count of transformers' model (built on the meta
    device: nothing allocated)."""
    cfg = DecoderConfig.from_hf_dict(REAL_CONFIGS[name])
    hc = transformers.AutoConfig.for_model(**REAL_CONFIGS[name])
    with torch.device("meta"):
        tmodel = transformers.AutoModelForCausalLM.from_config(hc)
    theirs = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    if cfg.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert hf_weight_shapes(cfg) == theirs
    n_theirs = sum(p.numel() for p in tmodel.parameters())
    abstract = nnx.eval_shape(lambda: Decoder(cfg, ModelOptions(), rngs=nnx.Rngs(0)))
    n_ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n_ours == n_theirs
    # and back: the config we would export describes the same model
    assert DecoderConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert DecoderConfig.from_hf_dict(hc.to_dict()) == cfg
