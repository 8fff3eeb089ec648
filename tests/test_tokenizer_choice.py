"""Which tokenizer a run uses, and what must fit the model: a checkpoint's own tokenizer when
`data.tokenizer` is unset, `data.chat_template` in place of the tokenizer's template, the
refusals of a vocabulary larger than the embedding and of a `data.max_length` past the
model's context, and a local-looking data path that does not exist."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from mmpo_jax import cli
from mmpo_jax.config import load_config
from mmpo_jax.data.tiny_tokenizer import tokenizer_config, train_tiny_tokenizer
from mmpo_jax.errors import UserError
from mmpo_jax.train import run_data

TINY = "configs/tiny.yaml"
OWN_VOCAB = 384  # the checkpoint's tokenizer: not builtin:tiny's 2048


def _write_tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE of `vocab` ids with builtin:tiny's special tokens and chat template,
    trained on other text: the same text gets other ids."""
    from mmpo_jax.data.builtin import load_demo_rows

    texts = [m["content"] for row in load_demo_rows("train")[:400] for m in row["prompt"] + row["chosen"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(train_tiny_tokenizer(texts[::-1], vocab_size=vocab).to_str())
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config()))


def _checkpoint(out: Path, vocab_size: int, **init) -> Path:
    """A random tiny Llama saved as an HF directory with a tokenizer of OWN_VOCAB ids."""
    from mmpo_jax.models.build import build_model
    from mmpo_jax.models.hf_export import export_hf
    from mmpo_jax.models.decoder_config import model_config_from_init
    from mmpo_jax.models.options import ModelOptions
    from transformers import AutoTokenizer

    tok_dir = out.parent / f"{out.name}-tokenizer"
    _write_tokenizer(tok_dir, OWN_VOCAB)
    init_section = dataclasses.replace(load_config(TINY).model.init, vocab_size=vocab_size, **init)
    arch = model_config_from_init(init_section)
    export_hf(build_model(arch, ModelOptions(), seed=1), arch, AutoTokenizer.from_pretrained(str(tok_dir)), out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "model", vocab_size=OWN_VOCAB,
                       max_position_embeddings=128)


def _prompt_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_a_checkpoint_run_tokenizes_with_the_checkpoints_own_tokenizer(checkpoint):
    """No data.tokenizer with a model.path: the ids are the checkpoint's tokenizer's (it used
    to be builtin:tiny, whose 2048 ids fit the embedding, so nothing failed)."""
    from transformers import AutoTokenizer

    from mmpo_jax.data.builtin import builtin_tokenizer_dir, load_demo_rows

    cfg = load_config(TINY, [f"model.path={checkpoint}", "data.test_files=null"])
    assert cfg.data.tokenizer == str(checkpoint)
    data = run_data.load_data(cfg)
    src = data.train.sources[0]
    row = load_demo_rows("train")[int(src.numbers[0]) - 1]  # numbers: the row's line, from 1
    prompt = [int(i) for i in src.ids(0)[0]]
    own = AutoTokenizer.from_pretrained(str(checkpoint))
    tiny = AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir("tiny")))
    assert len(data.tokenizer) == OWN_VOCAB
    assert prompt == _prompt_ids(own, row["prompt"])
    assert prompt != _prompt_ids(tiny, row["prompt"])  # negative control: the two differ here


def test_a_vocabulary_larger_than_the_embedding_is_refused_naming_both_sizes(tmp_path, capsys):
    small = _checkpoint(tmp_path / "small", vocab_size=256)  # its tokenizer has OWN_VOCAB ids
    argv = ["train", TINY, f"model.path={small}", "data.test_files=null", f"train.output_dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"has {OWN_VOCAB} tokens but the model's vocabulary has 256" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_max_length_past_the_models_context_is_refused(checkpoint, tmp_path, capsys):
    """data.max_length=100000 was accepted for a model of 8192 positions."""
    argv = ["train", TINY, f"model.path={checkpoint}", "data.test_files=null", "data.max_length=200",
            "data.max_prompt_length=100", f"train.output_dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "data.max_length=200 is longer than the model's context" in err
    assert "max_position_embeddings=128" in err and "data.max_length <= 128" in err


def test_rope_scaling_stretches_the_context():
    from mmpo_jax.models.decoder_config import DecoderConfig

    base = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=4096)
    assert DecoderConfig(**base).context_length == 4096
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert DecoderConfig(**base, rope_scaling=yarn).context_length == 16384  # Qwen's YaRN recipe
    assert DecoderConfig(**base, rope_scaling={"rope_type": "linear", "factor": 2.0}).context_length == 8192
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 512}
    assert DecoderConfig(**base, rope_scaling=llama3).context_length == 4096  # already the extended length


def test_chat_template_replaces_the_tokenizers(tmp_path):
    """data.chat_template (TRL recipes' chat_template), as text or a file, renders every row;
    the tokenized cache is keyed by it (the fingerprint changes)."""
    from mmpo_jax.config_schema import DataConfig
    from mmpo_jax.data.tokenizers import tokenizer_fingerprint, tokenizer_of

    template = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    messages = [{"role": "user", "content": "hi"}]
    plain = tokenizer_of(DataConfig(tokenizer="builtin:tiny"))
    as_text = tokenizer_of(DataConfig(tokenizer="builtin:tiny", chat_template=template))
    file = tmp_path / "template.jinja"
    file.write_text(template)
    from_file = tokenizer_of(DataConfig(tokenizer="builtin:tiny", chat_template=str(file)))
    for tok in (as_text, from_file):
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == "[user] hi[assistant] "
    assert plain.apply_chat_template(messages, tokenize=False) != "[user] hi"
    assert tokenizer_fingerprint(as_text) == tokenizer_fingerprint(from_file) != tokenizer_fingerprint(plain)
    with pytest.raises(UserError, match=r"data.chat_template: no such file 'nope.jinja'"):
        tokenizer_of(DataConfig(tokenizer="builtin:tiny", chat_template="nope.jinja"))
    (tmp_path / "empty.txt").write_text("just text")
    with pytest.raises(UserError, match=r"holds no Jinja template"):
        tokenizer_of(DataConfig(tokenizer="builtin:tiny", chat_template=str(tmp_path / "empty.txt")))


@pytest.mark.parametrize("spec", ["./no/such/prefs", "no_such_dir/a/prefs", "/tmp/no-such-mmpo-dir/prefs",
                                  "tests/no_such_prefs"])
def test_a_local_looking_data_path_that_does_not_exist_fails_at_once(spec, tmp_path, monkeypatch, capsys):
    """A path without an extension went to the hub as a dataset id (31 s of retries)."""
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("asked the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    started = time.time()
    assert cli.main(["train", TINY, f"data.train_files={spec}", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert f"data.train_files: no such file or directory '{spec}'" in capsys.readouterr().err
    assert time.time() - started < 10
