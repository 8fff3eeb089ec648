"""`mmpo-jax aot-check`: the train step compiled for a TPU topology on this CPU.

The compiles need libtpu (`pip install -e '.[aot]'`) and are skipped without it;
everything else (topology names, the abstract state against the real one, the
architecture read from a config.json) runs anywhere.
"""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from mmpo_jax import aot
from mmpo_jax.cli import main
from mmpo_jax.config import load_config
from mmpo_jax.errors import UserError
from mmpo_jax.train.reference import reference_mode
from mmpo_jax.train.setup import abstract_train_state

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed: pip install -e '.[aot]'")


# --------------------------------------------------------------------------- #
# Topology names
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name,kind,chips", [("v5e:2x2", "v5e", 4), ("v5p:2x4x4", "v5p", 32),
                                             ("v4:2x2x1", "v4", 4), ("v6e:16x16", "v6e", 256)])
def test_parse_topology(name, kind, chips):
    topo = aot.parse_topology(name)
    assert (topo.name, topo.kind, topo.chips) == (name, kind, chips)
    assert topo.hbm_bytes == aot.HBM_BYTES_PER_CHIP[kind]


@pytest.mark.parametrize("name,says", [("v5e-16", "KIND:AxB"), ("v7x:2x2x1", "unknown TPU kind 'v7x'"),
                                       ("v5e:2x2x2", "v5e slice is AxB"), ("v5p:4x4", "v5p slice is AxBxC")])
def test_bad_topology_names_the_value(name, says):
    with pytest.raises(UserError, match=f"--topology '{name}'") as err:
        aot.parse_topology(name)
    assert says in str(err.value)


def test_without_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr(aot, "libtpu_version", lambda: None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[aot\]'"):
        aot.topology_devices(aot.parse_topology("v5e:2x2"))


# --------------------------------------------------------------------------- #
# The architecture and options of the target
# --------------------------------------------------------------------------- #
def test_architecture_from_config_json_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False, "rope_theta": 500000.0, "hidden_act": "silu"}))
    cfg = load_config("configs/tiny.yaml", [f"model.path={tmp_path}"])
    arch = aot.model_architecture(cfg)
    assert (arch.vocab_size, arch.num_hidden_layers, arch.tie_word_embeddings) == (1000, 3, False)


@pytest.mark.slow
def test_architecture_of_an_unreachable_hub_id_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config("configs/tiny.yaml", ["model.path=no-such-owner-zz/no-such-model-zz"])
    with pytest.raises(UserError, match=r"model.path='no-such-owner-zz/no-such-model-zz'.*model.init"):
        aot.model_architecture(cfg)


def test_target_options_compute_in_bfloat16_on_tpu():
    assert aot.target_options(load_config("configs/tiny.yaml", [])).compute_dtype == jnp.bfloat16
    assert aot.target_options(load_config("configs/tiny.yaml", ["model.compute_dtype=float32"])).compute_dtype \
        == jnp.float32
    with pytest.raises(UserError, match="model.attention=cudnn is a GPU kernel"):
        aot.target_options(load_config("configs/tiny.yaml", ["model.attention=cudnn"]))


# --------------------------------------------------------------------------- #
# The abstract state is the state `mmpo-jax train` builds (8 CPU devices, FSDP)
# --------------------------------------------------------------------------- #
MODES = {
    "separate": [],
    "precomputed": ["model.reference=precomputed"],
    "none": ["loss.name=simpo"],
    "lora_base": ["model.lora.rank=4", "model.lora.targets=[q,v,up]"],
}


def _real_and_abstract(overrides):
    """The state `create_state` places for the tiny config on 8 CPU devices (FSDP 4 x data 2),
    and the abstract one aot-check compiles with."""
    from flax import nnx

    from mmpo_jax.models.build import build_model
    from mmpo_jax.models.decoder_config import model_config_from_init
    from mmpo_jax.sharding import make_mesh, model_shardings
    from mmpo_jax.train.optim import make_optimizer
    from mmpo_jax.train.setup import model_options
    from mmpo_jax.train.state import create_state

    cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=4", "mesh.data=-1", *overrides])
    mesh, options = make_mesh(cfg.mesh), model_options(cfg)
    arch = model_config_from_init(cfg.model.init)
    optimizer = make_optimizer(cfg.optim, cfg.train.max_steps)
    # initialised eagerly, then placed as build_model places it (its jitted init on 8 CPU
    # devices costs ~20 s of compile here; the state's layout is the point)
    graphdef, params = nnx.split(build_model(arch, options, seed=cfg.train.seed))
    model = nnx.merge(graphdef, jax.device_put(params, model_shardings(params, mesh)))
    _, real = create_state(model, optimizer, lora=options.lora is not None, reference_mode=reference_mode(cfg.model.reference),
                           seed=cfg.train.seed, mesh=mesh)
    _, abstract = abstract_train_state(arch, options, optimizer, mesh, reference_mode=reference_mode(cfg.model.reference),
                                           seed=cfg.train.seed, init_scale=cfg.model.init.init_scale)
    return cfg, real, abstract


@pytest.mark.parametrize("mode", MODES)
def test_abstract_state_matches_the_real_one(mode):
    cfg, real, abstract = _real_and_abstract(MODES[mode])
    assert cfg.model.reference == mode
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
        assert (r.shape, r.dtype) == (a.shape, a.dtype)
    # the parameters (and the reference copy) on the same shards
    for part in ("trainable", "frozen", "rest", "reference"):
        r, a = getattr(real, part), getattr(abstract, part)
        assert (r is None) == (a is None)
        if r is not None:
            assert [x.sharding.spec for x in jax.tree.leaves(r)] == [x.sharding.spec for x in jax.tree.leaves(a)]


def test_separate_reference_is_stored_in_the_narrower_compute_dtype():
    from mmpo_jax.models.decoder_config import model_config_from_init
    from mmpo_jax.sharding import make_mesh
    from mmpo_jax.train.optim import make_optimizer

    cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=-1", "mesh.data=1"])
    options = aot.target_options(cfg)  # bfloat16 compute, float32 params
    _, state = abstract_train_state(model_config_from_init(cfg.model.init), options,
                                        make_optimizer(cfg.optim, 10), make_mesh(cfg.mesh), reference_mode=reference_mode("separate"))
    assert {x.dtype for x in jax.tree.leaves(state.reference)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.float32)}


def test_optimizer_state_is_sharded_like_the_params_in_a_real_run():
    """FSDP shards the AdamW moments with their parameters (a plain jit(optimizer.init)
    replicated them: zeros carry no sharding through XLA's propagation)."""
    _, real, abstract = _real_and_abstract([])
    mu = real.opt_state[1][0].mu
    assert mu["embed_tokens"].value.sharding.spec == real.trainable["embed_tokens"].value.sharding.spec
    assert "fsdp" in mu["embed_tokens"].value.sharding.spec
    assert [x.sharding.spec for x in jax.tree.leaves(real.opt_state)] == \
        [x.sharding.spec for x in jax.tree.leaves(abstract.opt_state)]


# --------------------------------------------------------------------------- #
# Real compiles for TPU (libtpu)
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@needs_libtpu
def test_tiny_on_v5e_2x2_fits(capsys):
    """The CI target: the tiny config's step compiled for 4 v5e chips."""
    assert main(["aot-check", "configs/tiny.yaml", "--topology", "v5e:2x2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    p = out["per_device_bytes"]
    assert p["total"] == p["arguments"] + p["outputs"] - p["aliased"] + p["temporaries"]
    assert p["arguments"] > 0 and p["aliased"] > 0  # the state is donated
    assert out["device_memory_bytes"] == 16 * 2**30 and out["fits"] is True
    assert out["topology"] == "v5e:2x2" and out["chips"] == 4 and out["device_kind"].startswith("TPU v5")
    assert out["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert out["model"]["compute_dtype"] == "bfloat16" and out["model"]["reference"] == "separate"
    assert out["batch"] == {"pairs": 8, "seq": 64, "grad_accum": 1, "packing": "none", "pack_length": None,
                            "pairs_per_device_per_micro_batch": 2}
    # auto on TPU: the splash kernel, forward and backward, in policy and reference passes
    assert out["model"]["attention"] == "splash" and out["model"]["pallas_calls"] >= 3
    assert out["compile_seconds"] > 0 and out["xla_refused"] is None
    assert 0 < out["state_bytes_per_device"] <= p["arguments"]  # XLA pads small arrays to TPU tiles


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_packed_tiny_with_splash_compiles_for_v5e_2x2(capsys, layout):
    """Packed rows (segment ids; shared_prompt: the two segment calls) through the splash
    kernel, compiled for TPU; a row of pack_length (256, a multiple of the kernel's 128
    block) per pair."""
    assert main(["aot-check", "configs/tiny.yaml", "--topology", "v5e:2x2", "--json", f"data.packing={layout}",
                 "data.max_length=128", "data.max_prompt_length=64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch"]["packing"] == layout and out["batch"]["pack_length"] == 256
    assert out["model"]["attention"] == "splash" and out["model"]["pallas_calls"] >= 3
    assert out["fits"] is True


@needs_libtpu
def test_not_fitting_exits_3(capsys):
    """LoRA, precomputed reference log-probs, FSDP on a 3-D v5p slice, and a batch whose
    [B, H, T, T] attention scores (XLA attention; splash, the TPU default, never
    materialises them) cannot fit one chip: XLA:TPU refuses
    to compile it, and aot-check says so with XLA's own figures."""
    code = main(["aot-check", "configs/tiny.yaml", "--topology", "v5p:2x2x1", "--json", "model.lora.rank=4",
                 "model.reference=precomputed", "mesh.fsdp=-1", "mesh.data=1", "data.batch_size=512",
                 "data.max_length=8192", "data.max_prompt_length=100", "model.attention=xla"])
    out = json.loads(capsys.readouterr().out)
    assert code == aot.EXIT_DOES_NOT_FIT
    assert out["fits"] is False and out["per_device_bytes"] is None
    refused = out["xla_refused"]
    assert refused["message"].startswith("RESOURCE_EXHAUSTED")
    assert refused["required_bytes"] > refused["available_bytes"] > 90 * 2**30
    assert out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and out["device_kind"].startswith("TPU v5")
    assert out["model"]["lora_rank"] == 4 and out["model"]["reference"] == "precomputed"
    # input_ids and loss_mask (2 x [128 pairs, 2, 8192] int32 per device), ref_logps, pair_mask, the state
    assert out["state_bytes_per_device"] > 2 * 128 * 2 * 8192 * 4
    table = aot.format_table(aot.AotResult(**out))
    assert "XLA refused to compile the step for want of HBM" in table and refused["message"] in table
    assert "DOES NOT FIT" in table and "limit 95% = 90.250 GiB" in table


def test_parse_hbm_refusal():
    temps = aot.parse_hbm_refusal("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                  "HLO temporaries (1.26T) exceeds available HBM (95.74G).")
    assert temps["required_bytes"] == int(1.26 * 2**40) and temps["available_bytes"] == int(95.74 * 2**30)
    used = aot.parse_hbm_refusal("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                                 "space hbm. Used 21.95G of 15.48G hbm.\n Exceeded hbm capacity by 6.47G.")
    assert used["message"].endswith("Used 21.95G of 15.48G hbm.")
    assert used["required_bytes"] == int(21.95 * 2**30) and used["available_bytes"] == int(15.48 * 2**30)
    assert aot.parse_hbm_refusal("INVALID_ARGUMENT: bad sharding") is None


def test_batch_that_does_not_split_is_a_user_error(capsys):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu not installed")
    code = main(["aot-check", "configs/tiny.yaml", "--topology", "v5e:2x2", "data.batch_size=6"])
    err = capsys.readouterr().err
    assert code == 2 and "data.batch_size=6" in err and "multiple of 4" in err


def test_bad_topology_exits_2_before_reading_the_config(capsys):
    assert main(["aot-check", "no-such-config.yaml", "--topology", "v5e"]) == 2
    assert "--topology 'v5e'" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# The table in tpu_scripts/README.md is the compiles' own output
# --------------------------------------------------------------------------- #
def test_readme_table_is_made_of_the_recorded_compiles():
    """Every row of the README's table comes from a recorded `aot-check --json` result
    (tpu_scripts/aot_results), and each verdict follows the rule: XLA's total within 95%
    of the chip's HBM, none when XLA refused to compile."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results = sorted((root / "tpu_scripts" / "aot_results").glob("*.json"))
    assert len(results) >= 10
    for path in results:
        d = json.loads(path.read_text())
        plan = d["per_device_bytes"]
        hbm = aot.HBM_BYTES_PER_CHIP[d["topology"].split(":")[0]]
        assert d["device_memory_bytes"] == hbm, path.name
        if plan is None:
            assert d["fits"] is False and d["xla_refused"]["required_bytes"] > d["xla_refused"]["available_bytes"]
        else:
            assert plan["total"] == plan["arguments"] + plan["outputs"] - plan["aliased"] + plan["temporaries"]
            assert d["fits"] == (plan["total"] <= aot.FIT_FRACTION * hbm), path.name
    table = subprocess.run([sys.executable, str(root / "benchmarks" / "aot_table.py"), str(results[0].parent)],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert table in (root / "tpu_scripts" / "README.md").read_text()
