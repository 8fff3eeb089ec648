"""`mmpo-jax compare`: our model against transformers' on tiny random checkpoints.

Run in-process through `mmpo_jax.cli.main` (jax and torch imported once); one
subprocess checks the real exit status and that a bad path prints no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from checkpoint_helpers import make_tokenizer, random_torch_model, save_hf_dir, write_gguf
from mmpo_jax.cli import main

KEYS = ("max_abs_token_logp_diff", "max_abs_seq_logp_diff")


def _compare(capfd, *argv: str) -> dict:
    code = main(["compare", *argv])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out  # stdout holds the JSON object and nothing else
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tokenizer = make_tokenizer()
    llama = random_torch_model("llama", head_dim=24)  # head_dim != hidden / heads
    qwen2 = random_torch_model("qwen2", num_key_value_heads=1, tie_word_embeddings=True)  # MQA, tied
    with torch.no_grad():
        for name, p in qwen2.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    mistral = random_torch_model("mistral", sliding_window=8)
    chat = random_torch_model("llama", vocab_size=len(tokenizer), seed=3)
    dirs = {
        "llama": save_hf_dir(llama, root / "llama"),
        "qwen2": save_hf_dir(qwen2, root / "qwen2"),
        "mistral": save_hf_dir(mistral.bfloat16(), root / "mistral"),  # bf16 weights on disk
        "chat": save_hf_dir(chat, root / "chat", tokenizer),
    }
    gguf = root / "tiny.gguf"
    write_gguf(gguf, random_torch_model("llama", vocab_size=len(tokenizer), seed=4), tokenizer)
    dirs["gguf"] = gguf
    return dirs


@pytest.mark.parametrize(
    "name,extra",
    [("llama", []), ("qwen2", ["--random-tokens", "20"]), ("mistral", ["--random-tokens", "24"])],
)
def test_compare_random_tiny_dirs_with_grads(capfd, tiny_dirs, name, extra):
    r = _compare(capfd, "--model", str(tiny_dirs[name]), "--json", "--grads", *extra)
    for key in (*KEYS, "max_rel_grad_diff"):
        assert isinstance(r[key], float), key
    print(name, {k: r[k] for k in (*KEYS, "max_rel_grad_diff", "mean_token_logp")})
    assert r["max_abs_token_logp_diff"] < 2e-5
    assert r["max_abs_seq_logp_diff"] < 1e-4
    assert r["max_rel_grad_diff"] < 1e-4
    assert r["mean_token_logp"] < -1.0 and r["num_sequences"] == 4
    assert r["batch"].startswith("random-tokens") and r["grad_tensors_compared"] >= 18


def test_compare_against_float64_torch(capfd, tiny_dirs):
    """transformers in float64: what remains is our own float32 error."""
    r = _compare(capfd, "--model", str(tiny_dirs["qwen2"]), "--json", "--grads", "--torch-dtype", "float64")
    assert r["torch_dtype"] == "float64"
    assert r["max_abs_token_logp_diff"] < 2e-5 and r["max_rel_grad_diff"] < 1e-4


def test_compare_chat_sample_with_tokenizer(capfd, tiny_dirs):
    r = _compare(capfd, "--model", str(tiny_dirs["chat"]), "--json")
    assert r["batch"] == "builtin-chat-sample (chat template)"
    assert 0 < r["num_completion_tokens"] < r["num_tokens"]
    assert "max_rel_grad_diff" not in r
    assert r["max_abs_token_logp_diff"] < 2e-5 and r["max_abs_seq_logp_diff"] < 1e-4


def test_compare_jsonl_data(capfd, tiny_dirs, tmp_path):
    data = tmp_path / "data.jsonl"
    records = [
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Rome."},
        {"prompt": [{"role": "user", "content": "Hello?"}],
         "chosen": [{"role": "assistant", "content": "Hello, world."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"messages": [{"role": "user", "content": "Why is the sky blue?"},
                      {"role": "assistant", "content": "Sunlight scatters."}]},
        {"prompt": "1 2 3", "completion": " 4 5 6"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    r = _compare(capfd, "--model", str(tiny_dirs["chat"]), "--data", str(data), "--json", "--grads")
    assert r["num_sequences"] == 7 and r["batch"] == f"data:{data}"
    assert r["max_abs_token_logp_diff"] < 2e-5 and r["max_rel_grad_diff"] < 1e-4
    r = _compare(capfd, "--model", str(tiny_dirs["chat"]), "--data", str(data), "--json", "--max-examples", "2")
    assert r["num_sequences"] == 2


def test_compare_gguf_against_transformers_gguf_loader(capfd, tiny_dirs):
    r = _compare(capfd, "--model", str(tiny_dirs["gguf"]), "--json", "--grads")
    assert r["format"] == "gguf" and r["batch"].startswith("builtin-chat-sample")
    assert r["max_abs_token_logp_diff"] < 2e-5 and r["max_rel_grad_diff"] < 1e-4


def test_compare_table_output(capfd, tiny_dirs):
    assert main(["compare", "--model", str(tiny_dirs["llama"]), "--random-tokens", "8"]) == 0
    out, _ = capfd.readouterr()
    assert "max |token logp diff|" in out and "max |sequence logp diff|" in out


def test_compare_user_errors(capfd, tiny_dirs, tmp_path):
    cases = [
        (["--model", str(tmp_path / "missing")], "no such file or directory"),
        (["--model", str(tmp_path)], "no config.json"),
        (["--model", str(tiny_dirs["llama"]), "--data", str(tmp_path / "none.jsonl")], "no such file"),
        (["--model", str(tiny_dirs["llama"]), "--data", str(tiny_dirs["llama"] / "config.json")],
         "no tokenizer"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    cases.append((["--model", str(tiny_dirs["chat"]), "--data", str(bad)], "bad.jsonl:1: expected 'text'"))
    for argv, message in cases:
        assert main(["compare", *argv, "--json"]) == 2, argv
        out, err = capfd.readouterr()
        assert message in err and out == "", (argv, err)


@pytest.mark.slow
def test_compare_bad_path_exit_status_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmpo_jax.cli", "compare", "--model", str(tmp_path / "nope"), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "no such file or directory" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
