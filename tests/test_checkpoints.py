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
from mmpo_jax.models import pretrained as C
from mmpo_jax.models.build import build_model
from mmpo_jax.models.hf_export import export_hf
from mmpo_jax.models.hf_weights import iter_hf_weights
from mmpo_jax.models.decoder_config import DecoderConfig
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
    from mmpo_jax.models.decoder_config import DecoderConfig
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
    cfg = DecoderConfig.from_hf_dict(source.hf_config)
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
        from mmpo_jax.models.pretrained import resolve_checkpoint_path
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
        from mmpo_jax.models.pretrained import resolve_checkpoint_path
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


@pytest.mark.slow
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
        from mmpo_jax.models.pretrained import load_checkpoint, resolve_checkpoint_path
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


# --------------------------------------------------------------------------- #
# safetensors files that lie (written byte by byte)
# --------------------------------------------------------------------------- #
TINY_ARCH = DecoderConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A one-layer model exported in float32 and in bfloat16 (the memory-mapped path)."""
    root = tmp_path_factory.mktemp("tiny")
    model = build_model(TINY_ARCH, ModelOptions(), seed=0)
    return {dtype: export_hf(model, TINY_ARCH, None, root / dtype, dtype=dtype)
            for dtype in ("float32", "bfloat16")}


def _split(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _hostile_copy(good, tmp_path, header, data, length=None):
    """`good`'s config.json beside a model.safetensors of `header` and `data` written by hand;
    `length` overrides the 8-byte header length."""
    out = tmp_path / "hostile"
    out.mkdir()
    (out / "config.json").write_text((good / "config.json").read_text())
    text = json.dumps(header).encode() if isinstance(header, (dict, list)) else header
    prefix = (len(text) if length is None else length).to_bytes(8, "little")
    (out / "model.safetensors").write_bytes(prefix + text + data)
    return out


def _lie(kind, header, data):
    """`header` and `data` (of a real file) changed to tell one lie of `kind`."""
    e = header[EMBED]
    begin, end = e["data_offsets"]
    if kind == "offsets past the end":
        e["data_offsets"] = [begin, len(data) + 64]
    elif kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "shape":
        e["shape"] = [e["shape"][0] + 1, e["shape"][1]]
    elif kind == "dtype unknown":
        e["dtype"] = "EVIL"
    elif kind == "dtype of another size":
        e["dtype"] = "F16" if e["dtype"] == "F32" else "F32"
    elif kind == "overlap":
        other = next(n for n, t in header.items() if n not in (EMBED, "__metadata__")
                     and t["data_offsets"][1] - t["data_offsets"][0] <= end - begin)
        o = header[other]
        size = o["data_offsets"][1] - o["data_offsets"][0]
        o["data_offsets"] = [begin, begin + size]  # inside the embedding's bytes
    elif kind == "gap":
        data = data + bytes(16)  # trailing bytes that belong to no tensor
    elif kind == "negative shape":
        e["shape"] = [-e["shape"][0], e["shape"][1]]
    elif kind == "offsets not a pair":
        e["data_offsets"] = [begin]
    elif kind == "entry not a mapping":
        header[EMBED] = "F32"
    return header, data


LIES = ["offsets past the end", "truncated", "shape", "dtype unknown", "dtype of another size", "overlap",
        "gap", "negative shape", "offsets not a pair", "entry not a mapping"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", LIES)
def test_a_safetensors_file_that_lies_is_one_line_naming_file_and_tensor(tiny_dirs, tmp_path, dtype, kind):
    header, data = _lie(kind, *_split(tiny_dirs[dtype] / "model.safetensors"))
    bad = _hostile_copy(tiny_dirs[dtype], tmp_path, header, data)
    with pytest.raises(UserError) as err:
        C.load_checkpoint(bad, F32)
    message = str(err.value)
    assert message.startswith(f"'{bad / 'model.safetensors'}' is not a valid safetensors file: "), message
    assert "\n" not in message
    if kind not in ("truncated", "gap"):  # those are the file's, not one tensor's
        assert f"'{EMBED}'" in message, message


@pytest.mark.parametrize("length, named", [
    (2**63, "header length 9223372036854775808 is past the end of the file"),  # read(2**63) overflowed
    (10**6, "is past the end of the file"),
    (3, "header is not JSON"),
])
def test_a_lying_header_length_is_one_line(tiny_dirs, tmp_path, length, named):
    header, data = _split(tiny_dirs["float32"] / "model.safetensors")
    bad = _hostile_copy(tiny_dirs["float32"], tmp_path, header, data, length=length)
    with pytest.raises(UserError, match=named):
        C.load_checkpoint(bad, F32)


@pytest.mark.parametrize("content, named", [
    (b"\x01\x02\x03", "it has 3 bytes, fewer than the 8"),
    (b"\x06\0\0\0\0\0\0\0[1, 2]", "its header is a JSON list, not an object"),
    (b"\x04\0\0\0\0\0\0\0\xff\xfe{}", "header is not JSON"),
])
def test_not_a_safetensors_file_at_all(tiny_dirs, tmp_path, content, named):
    bad = _hostile_copy(tiny_dirs["float32"], tmp_path, b"", b"")
    (bad / "model.safetensors").write_bytes(content)
    with pytest.raises(UserError, match=named):
        C.load_checkpoint(bad, F32)


def test_an_index_naming_a_tensor_its_shard_lacks(tiny_dirs, tmp_path):
    good = tiny_dirs["float32"]
    out = tmp_path / "sharded"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((good / name).read_bytes())
    names = [n for n in _split(good / "model.safetensors")[0] if n != "__metadata__"]
    weight_map = {**{n: "model.safetensors" for n in names}, "model.norm.extra": "model.safetensors"}
    (out / C.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match=r"puts tensor 'model.norm.extra' in 'model.safetensors', which does not"):
        C.load_checkpoint(out, F32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_file_rewritten_by_hand_without_lies_loads_the_same(tiny_dirs, tmp_path, dtype):
    """Negative control: the same header re-serialised (other key order, padded as
    safetensors pads) and the same bytes load to the same weights."""
    good = tiny_dirs[dtype]
    header, data = _split(good / "model.safetensors")
    text = json.dumps(dict(reversed(list(header.items())))).encode()
    text += b" " * (-len(text) % 8)
    copy = _hostile_copy(good, tmp_path, text, data)
    expected = _weights(C.load_checkpoint(good, F32)[0])
    for name, value in _weights(C.load_checkpoint(copy, F32)[0]).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_a_file_changed_after_its_header_was_checked_names_the_tensor(tiny_dirs, tmp_path):
    """Between the check and the read (a download still running, a disk going bad):
    safetensors' own error, as one line naming the file and the tensor."""
    good = tiny_dirs["float32"]
    header, data = _split(good / "model.safetensors")
    copy = _hostile_copy(good, tmp_path, header, data)
    reader = C.SafetensorsReader.from_dir(copy)
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(UserError, match=rf"'{path}': cannot read tensor '{EMBED}' \(SafetensorError: "):
        reader.get(EMBED)
