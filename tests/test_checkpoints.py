"""HF checkpoints: local directories (single file, sharded index, bf16), hub ids, export.

Tiny transformers models with a large random init are saved with transformers'
own `save_pretrained`, loaded into our model, and compared with transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from checkpoint_helpers import (
    jax_token_logps,
    make_tokenizer,
    random_torch_model,
    save_hf_dir,
    torch_token_logps,
)
from mmpo_jax.errors import UserError
from mmpo_jax.models import checkpoints as C
from mmpo_jax.models.hf_export import export_hf
from mmpo_jax.models.hf_weights import iter_hf_weights
from mmpo_jax.models.options import ModelOptions

F32 = ModelOptions(param_dtype="float32", compute_dtype="float32", attention="xla")
IDS = np.random.default_rng(0).integers(0, 211, size=(3, 20))


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """The same tiny Llama (untied, GQA) saved three ways, plus a tokenizer in the first."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = make_tokenizer()
    model = random_torch_model("llama", vocab_size=len(tokenizer))
    single = save_hf_dir(model, root / "single", tokenizer)
    sharded = save_hf_dir(model, root / "sharded", max_shard_size="40KB")
    bf16 = random_torch_model("llama", vocab_size=len(tokenizer))
    bf16.load_state_dict(model.state_dict())
    bf16 = save_hf_dir(bf16.bfloat16(), root / "bf16")
    return model, tokenizer, single, sharded, bf16


def _weights(model) -> dict[str, np.ndarray]:
    return dict(iter_hf_weights(model))


def test_single_file_loads_exact_weights_and_logps(llama_dirs):
    torch_model, tokenizer, single, _, _ = llama_dirs
    model, cfg, tok = C.load_checkpoint(single, F32)
    assert cfg.vocab_size == len(tokenizer) and not cfg.tie_word_embeddings
    state = torch_model.state_dict()
    for name, value in _weights(model).items():
        np.testing.assert_array_equal(value, state[name].numpy(), err_msg=name)
    ids = IDS % cfg.vocab_size
    diff = np.abs(jax_token_logps(model, ids) - torch_token_logps(torch_model, ids))[:, 1:].max()
    assert diff < 1e-5, diff
    assert tok is not None and tok("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_sharded_index_loads_the_same_as_single_file(llama_dirs):
    _, _, single, sharded, _ = llama_dirs
    assert (sharded / C.SAFETENSORS_INDEX).is_file()
    assert len(set(json.loads((sharded / C.SAFETENSORS_INDEX).read_text())["weight_map"].values())) > 1
    a, _, _ = C.load_checkpoint(single, F32)
    b, _, tok = C.load_checkpoint(sharded, F32)
    assert tok is None  # no tokenizer files there
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def test_bf16_safetensors(llama_dirs):
    """numpy has no bfloat16: those tensors are read through ml_dtypes."""
    torch_model, _, _, _, bf16 = llama_dirs
    model, _, _ = C.load_checkpoint(bf16, F32)
    state = torch_model.state_dict()
    for name, value in _weights(model).items():
        np.testing.assert_array_equal(value, state[name].bfloat16().float().numpy(), err_msg=name)


def test_pytorch_bin_weights(tmp_path, llama_dirs):
    """Older checkpoints without safetensors: pytorch_model.bin, read through torch."""
    import torch

    torch_model, _, single, _, _ = llama_dirs
    old = tmp_path / "bin"
    old.mkdir()
    (old / "config.json").write_text((single / "config.json").read_text())
    torch.save(torch_model.state_dict(), old / "pytorch_model.bin")
    model, _, _ = C.load_checkpoint(old, F32)
    state = torch_model.state_dict()
    for name, value in _weights(model).items():
        np.testing.assert_array_equal(value, state[name].numpy(), err_msg=name)


def test_each_tensor_read_once_when_sharded_over_devices(llama_dirs):
    """build_model asks per device shard; the source reads each tensor from disk once."""
    import jax

    from mmpo_jax.config_schema import MeshConfig
    from mmpo_jax.models.build import build_model
    from mmpo_jax.models.llama_config import LlamaConfig
    from mmpo_jax.sharding import make_mesh

    _, _, single, _, _ = llama_dirs
    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 simulated devices of conftest.py")
    source = C.open_checkpoint(single)
    reads: dict[str, int] = {}
    inner = source.get_tensor._get

    def counting(name):
        reads[name] = reads.get(name, 0) + 1
        return inner(name)

    source.get_tensor._get = counting
    cfg = LlamaConfig.from_hf_dict(source.hf_config)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = build_model(cfg, F32, mesh=mesh, get_tensor=source.get_tensor)
    assert reads and max(reads.values()) == 1, {k: v for k, v in reads.items() if v > 1}
    q = model.layers.self_attn.q_kernel[...]
    assert len(q.sharding.device_set) == 8
    ref, _, _ = C.load_checkpoint(single, F32)
    ids = IDS % cfg.vocab_size
    np.testing.assert_allclose(jax_token_logps(model, ids), jax_token_logps(ref, ids), atol=1e-5)


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_export_round_trip_through_transformers(tmp_path, kind, llama_dirs):
    """load -> export -> transformers.from_pretrained: same log-probs (1e-5); tokenizer files too."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tokenizer, _, _, _ = llama_dirs
    overrides = {"tie_word_embeddings": True} if kind == "qwen2" else {"head_dim": 24}
    torch_model = random_torch_model(kind, vocab_size=len(tokenizer), **overrides)
    if kind == "qwen2":  # non-zero biases
        with torch.no_grad():
            for name, p in torch_model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    src = save_hf_dir(torch_model, tmp_path / "src", tokenizer)
    model, cfg, tok = C.load_checkpoint(src, F32)
    out = export_hf(model, cfg, tok, tmp_path / "export")
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(back).__name__ == type(torch_model).__name__
    ids = IDS % cfg.vocab_size
    ours = jax_token_logps(model, ids)
    np.testing.assert_allclose(torch_token_logps(back, ids)[:, 1:], ours[:, 1:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(torch_token_logps(torch_model, ids)[:, 1:], ours[:, 1:], atol=1e-5, rtol=0)
    state = torch_model.state_dict()
    for name, value in back.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name].numpy(), err_msg=name)
    # The tokenizer and its chat template come back.
    tok2 = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok2("The quick brown fox")["input_ids"] == tokenizer("The quick brown fox")["input_ids"]
    # And our own loader reads the export back.
    again, cfg2, tok3 = C.load_checkpoint(out, F32)
    assert cfg2 == cfg and tok3 is not None
    np.testing.assert_array_equal(jax_token_logps(again, ids), ours)


def test_export_sharded_and_bf16(tmp_path, llama_dirs):
    import torch
    from transformers import AutoModelForCausalLM

    torch_model, _, single, _, _ = llama_dirs
    model, cfg, _ = C.load_checkpoint(single, F32)
    out = export_hf(model, cfg, None, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((out / C.SAFETENSORS_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not list(out.glob(".export-*")) and not (out / "tokenizer.json").exists()
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    state = torch_model.state_dict()
    for name, value in back.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name].numpy(), err_msg=name)
    # bf16 export: transformers reads the same rounded values.
    out16 = export_hf(model, cfg, None, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back16 = AutoModelForCausalLM.from_pretrained(str(out16), dtype=torch.bfloat16)
    for name, value in back16.state_dict().items():
        assert torch.equal(value, state[name].bfloat16()), name


# --------------------------------------------------------------------------- #
# Errors a user can act on
# --------------------------------------------------------------------------- #
def test_bad_local_paths(tmp_path, llama_dirs):
    with pytest.raises(UserError, match="no such file or directory"):
        C.load_checkpoint(tmp_path / "nope", F32)
    with pytest.raises(UserError, match="no config.json"):
        C.load_checkpoint(tmp_path, F32)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a .gguf"):
        C.load_checkpoint(tmp_path / "notes.txt", F32)
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((llama_dirs[2] / "config.json").read_text())
    with pytest.raises(UserError, match="no \\*.safetensors"):
        C.load_checkpoint(cfg_only, F32)


def test_missing_tensor_and_bad_config(tmp_path, llama_dirs):
    from safetensors.numpy import load_file, save_file

    single = llama_dirs[2]
    holed = tmp_path / "holed"
    holed.mkdir()
    (holed / "config.json").write_text((single / "config.json").read_text())
    tensors = load_file(str(single / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(holed / "model.safetensors"))
    with pytest.raises(UserError, match=r"lacks tensors .*model\.layers\.1\.mlp\.up_proj\.weight"):
        C.load_checkpoint(holed, F32)
    cfg = json.loads((single / "config.json").read_text())
    (holed / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        C.load_checkpoint(holed, F32)
    save_file(load_file(str(single / "model.safetensors")), str(holed / "model.safetensors"))
    (holed / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(UserError, match=r"mlp\.\w+_proj\.weight' has shape \[\d+, \d+\], expected"):
        C.load_checkpoint(holed, F32)


def _hub_script(env: dict[str, str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        """
        from mmpo_jax.errors import UserError
        from mmpo_jax.models.checkpoints import resolve_checkpoint_path
        try:
            resolve_checkpoint_path("mmpo-test-org/definitely-not-cached-model")
        except UserError as err:
            print("USERERROR:", err)
        """
    )
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        # The hub "online" but unreachable: a closed local port.
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"},
    ],
    ids=["offline", "unreachable"],
)
def test_hub_id_without_network_says_so(tmp_path, env):
    proc = _hub_script({**env, "HF_HOME": str(tmp_path / "hf_home")})
    out = proc.stdout + proc.stderr
    assert "USERERROR:" in proc.stdout, out
    assert "hub is unreachable" in proc.stdout and "local directory path" in proc.stdout, out


@pytest.mark.parametrize("spec", ["models/SmolLM2-135M", "models/SmolLM2-135M/weights.gguf"])
def test_missing_relative_path_shaped_like_a_hub_id_says_no_local_path_first(tmp_path, monkeypatch, spec):
    """`models/X` that does not exist is reported as a missing local path (resolved against
    the current directory) before the hub's reason, which is kept."""
    unreachable = "cannot download 'models/SmolLM2-135M': the Hugging Face hub is unreachable [offline]"

    def offline(repo_id, filename=None):
        raise UserError(unreachable)

    monkeypatch.setattr(C, "_hub_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        C.resolve_checkpoint_path(spec)
    message = str(info.value)
    assert message.startswith(f"no such local file or directory '{spec}' (looked for {tmp_path / spec})")
    assert message.endswith(f"could not be fetched from the hub as a hub id: {unreachable}")


def test_missing_relative_path_offline_end_to_end(tmp_path):
    """The same through the real hub client with HF_HUB_OFFLINE=1: local path first, hub reason kept."""
    code = textwrap.dedent(
        """
        from mmpo_jax.errors import UserError
        from mmpo_jax.models.checkpoints import resolve_checkpoint_path
        try:
            resolve_checkpoint_path("models/SmolLM2-135M")
        except UserError as err:
            print("USERERROR:", err)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    want = f"USERERROR: no such local file or directory 'models/SmolLM2-135M' (looked for {tmp_path}/models/SmolLM2-135M)"
    assert proc.stdout.startswith(want), proc.stdout + proc.stderr
    assert "hub is unreachable" in proc.stdout


def test_hub_id_found_in_the_local_cache(tmp_path, llama_dirs):
    """A hub id resolves through huggingface_hub's cache (offline here: the cached snapshot)."""
    import shutil

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--mmpo-test--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    shutil.copytree(llama_dirs[2], snap)
    code = textwrap.dedent(
        """
        from mmpo_jax.models.checkpoints import load_checkpoint, resolve_checkpoint_path
        print("PATH:", resolve_checkpoint_path("mmpo-test/tiny-llama"))
        model, cfg, tok = load_checkpoint("mmpo-test/tiny-llama")
        print("VOCAB:", cfg.vocab_size, "TOKENIZER:", tok is not None)
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"PATH: {snap}" in proc.stdout
    assert f"VOCAB: {len(llama_dirs[1])} TOKENIZER: True" in proc.stdout
