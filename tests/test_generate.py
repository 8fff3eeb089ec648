"""Batched generation with a KV cache (`mmpo_jax.eval.generate`, `mmpo-jax generate`).

The model: the configs/tiny.yaml architecture (4 heads, 2 kv heads: grouped-query
attention), sharded on the tests' 8 simulated devices like the train step, with large
random weights (so the next-token distributions are far from uniform and greedy
choices are not near-ties that float rounding could flip). Each result is checked
against an independent computation: the ordinary forward without a cache, transformers'
`generate`, the sampling distribution computed by hand. One batch shape and one
`max_new_tokens` throughout, so the tests share the compiled programs.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.config import load_config
from mmpo_jax.eval.generate import (
    GenerationConfig,
    _Static,
    attention_mask,
    generate,
    left_pad,
    next_tokens,
    prompt_bucket,
    tokenize_prompts,
)
from mmpo_jax.models.attention import window_mask
from mmpo_jax.models.build import build_model
from mmpo_jax.models.decoder_config import DecoderConfig, model_config_from_init
from mmpo_jax.models.options import LORA_TARGETS, LoraOptions, ModelOptions
from mmpo_jax.sharding import make_mesh
from mmpo_jax.train.setup import model_options
from model_parity import MIN_GAP, random_hf_weights, reference_greedy

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
N_NEW = 10
# prompt lengths of the batch: left padding of 0, 9 and 12 slots (and the bucket's 3 more)
LENGTHS = (13, 4, 1)


@pytest.fixture(scope="module")
def tiny():
    """(model on the 8-device mesh, architecture, run config, hf weights)."""
    cfg = load_config(TINY, [])
    arch = model_config_from_init(cfg.model.init)
    assert arch.num_key_value_heads < arch.num_attention_heads  # GQA
    weights = random_hf_weights(arch)
    model = build_model(arch, model_options(cfg), mesh=make_mesh(cfg.mesh), get_tensor=weights.__getitem__)
    return model, arch, cfg, weights


@pytest.fixture(scope="module")
def prompts(tiny):
    rng = np.random.default_rng(1)
    return [[int(t) for t in rng.integers(3, tiny[1].vocab_size, n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def greedy_reference(tiny, prompts):
    tokens, gap = reference_greedy(tiny[0], prompts, N_NEW)
    assert gap > MIN_GAP, f"a near-tie on the greedy path (gap {gap:.2e}): the comparison would be fragile"
    # the rows differ, and do not just repeat one token: a real sequence to match
    assert len({tuple(r) for r in tokens}) == len(prompts)
    assert all(len(set(r)) > 2 for r in tokens)
    return tokens


def test_cached_greedy_matches_uncached_forward(tiny, prompts, greedy_reference):
    """Left-padded batch of different lengths, GQA, sharded: token for token the
    recomputation without a cache; every row runs to max_new_tokens."""
    model = tiny[0]
    gen = generate(model, prompts, GenerationConfig(max_new_tokens=N_NEW, eos_ids=()))
    assert gen.tokens.shape == (len(prompts), N_NEW)
    np.testing.assert_array_equal(gen.tokens, greedy_reference)
    np.testing.assert_array_equal(gen.num_tokens, [N_NEW] * len(prompts))
    assert not gen.stopped.any()
    # a prompt alone (other padding, other batch position) gives its row of the batch
    alone = generate(model, [prompts[1]], GenerationConfig(max_new_tokens=N_NEW, eos_ids=()))
    np.testing.assert_array_equal(alone.tokens[0], greedy_reference[1])


def test_greedy_matches_transformers_generate(tiny, prompts, greedy_reference):
    """The same weights, exported with `iter_hf_weights` into transformers'
    LlamaForCausalLM: `generate(do_sample=False)` on the same left-padded batch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mmpo_jax.models.hf_weights import iter_hf_weights

    model, arch = tiny[0], tiny[1]
    hc = transformers.AutoConfig.for_model(**arch.to_hf_dict())
    tmodel = transformers.AutoModelForCausalLM.from_config(hc, attn_implementation="eager", dtype=torch.float32)
    assert type(tmodel).__name__ == "LlamaForCausalLM"
    state = {k: torch.from_numpy(v.copy()) for k, v in iter_hf_weights(model)}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
    missing, unexpected = tmodel.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    ids, pad = left_pad(prompts, 0)
    mask = (np.arange(ids.shape[1])[None] >= pad[:, None]).astype(np.int64)
    with torch.no_grad():
        out = tmodel.eval().generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
            do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0, eos_token_id=None,
        )
    theirs = out[:, ids.shape[1]:].numpy()
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=N_NEW, eos_ids=())).tokens
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(theirs, greedy_reference)


def test_eos_stops_a_row_and_others_continue(tiny, prompts, greedy_reference):
    """An EOS id taken from row 0's greedy path stops row 0 there (EOS kept, then pad,
    not counted); the other rows stop at their own first EOS, if any, or run on."""
    model = tiny[0]
    ref = greedy_reference
    k = 3
    eos = int(ref[0, k])
    assert eos not in ref[0, :k]
    other = next(int(t) for t in ref[1, 5:] if t not in ref[0] and t not in ref[2])  # stops row 1 only
    pad_id = 7
    gen = generate(model, prompts, GenerationConfig(max_new_tokens=N_NEW, eos_ids=(eos, other), pad_id=pad_id))
    for b in range(len(prompts)):
        hits = [i for i, t in enumerate(ref[b]) if t in (eos, other)]
        stop = hits[0] if hits else None
        if stop is None:
            np.testing.assert_array_equal(gen.tokens[b], ref[b])
            assert gen.num_tokens[b] == N_NEW and not gen.stopped[b]
        else:
            np.testing.assert_array_equal(gen.tokens[b, : stop + 1], ref[b, : stop + 1])
            assert (gen.tokens[b, stop + 1:] == pad_id).all()
            assert gen.num_tokens[b] == stop and gen.stopped[b]
            assert gen.response_ids(b) == list(ref[b, :stop])
    assert gen.num_tokens[0] == k and gen.stopped[0]
    assert gen.stopped[1]
    # every row stopped early: the loop ends, and nothing after the EOS is written
    firsts = tuple(int(t) for t in ref[:, 1])
    gen = generate(model, prompts, GenerationConfig(max_new_tokens=N_NEW, eos_ids=firsts, pad_id=pad_id))
    for b in range(len(prompts)):
        stop = next(i for i, t in enumerate(ref[b]) if t in firsts)
        assert stop <= 1 and gen.num_tokens[b] == stop and gen.stopped[b]
        assert (gen.tokens[b, stop + 1:] == pad_id).all()


def test_sampling_limits_and_seeds(tiny, prompts, greedy_reference):
    """Temperature -> 0 and a tiny top-p both give the greedy tokens; one seed gives
    the same samples (also when a prompt is sampled in another batch), another seed
    other samples."""
    model = tiny[0]

    def sample(temperature, top_p, seed, batch=prompts, row_ids=None):
        cfg = GenerationConfig(max_new_tokens=N_NEW, eos_ids=(), temperature=temperature, top_p=top_p)
        return generate(model, batch, cfg, seed=seed, row_ids=row_ids).tokens

    np.testing.assert_array_equal(sample(1e-4, 0.9, 0), greedy_reference)
    np.testing.assert_array_equal(sample(1.0, 1e-6, 0), greedy_reference)
    a, b, c = sample(1.0, 0.9, 0), sample(1.0, 0.9, 0), sample(1.0, 0.9, 1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(axis=1).all(), (a, c)  # every row differs somewhere
    assert (a != greedy_reference).any()
    alone = sample(1.0, 0.9, 0, batch=[prompts[2]], row_ids=[2])
    np.testing.assert_array_equal(alone[0], a[2])


def test_next_tokens_follows_the_tempered_nucleus():
    """The sampler alone, against the distribution computed by hand: softmax(logits / T)
    cut to the smallest set of most likely tokens reaching top_p, renormalised."""
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.25, 0.2], [0.3, 0.1, 0.35, 0.05, 0.2]], np.float32))
    temperature, top_p, n = 0.8, 0.6, 4000

    def expected(row):
        p = np.exp(row / temperature)
        p /= p.sum()
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        return q / q.sum()

    static = _Static(max_new_tokens=1, pad_id=0, greedy=False, use_top_p=True)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(0), r))(jnp.arange(n))

    @jax.jit
    def draw(keys):
        # n draws of each row: keys along the batch, the same logits repeated
        rows = jnp.repeat(jnp.asarray(logits), n, axis=0)
        return next_tokens(rows, jnp.concatenate([keys, keys]), 0, jnp.float32(temperature),
                           jnp.float32(top_p), static).reshape(2, n)

    samples = np.asarray(draw(keys))
    for b in range(2):
        q = expected(logits[b])
        freq = np.bincount(samples[b], minlength=q.size) / n
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(q)), (freq, q)  # nothing outside the nucleus
        np.testing.assert_allclose(freq, q, atol=0.03)  # ~4 standard errors at n=4000
    assert len(set(np.flatnonzero(expected(logits[0])))) == 2  # the cut removes tokens here


def test_masks_and_padding_layout():
    ids, pad = left_pad([[5, 6, 7], [8]], 0, prompt_bucket(3))
    assert ids.shape == (2, 16) and list(pad) == [13, 15]
    assert list(ids[0, -3:]) == [5, 6, 7] and (ids[0, :13] == 0).all() and ids[1, -1] == 8
    assert prompt_bucket(16) == 16 and prompt_bucket(17) == 32 and prompt_bucket(1) == 16
    m = np.asarray(attention_mask(jnp.asarray([1, 0]), jnp.asarray([2, 3]), 5)
                   & window_mask(jnp.asarray([2, 3]), 5, 2)[None])
    # row 0: slot 0 is padding; a query sees itself and one slot back (window 2)
    assert m[0, 0].tolist() == [False, True, True, False, False]
    assert m[0, 1].tolist() == [False, False, True, True, False]
    assert m[1, 1].tolist() == [False, False, True, True, False]
    full = np.asarray(attention_mask(jnp.asarray([1, 0]), jnp.asarray([2]), 5))
    assert full[0, 0].tolist() == [False, True, True, False, False]
    assert full[1, 0].tolist() == [True, True, True, False, False]


def test_unscanned_lora_sliding_window_matches_uncached_forward():
    """The cache path without scanned layers, with Mistral's sliding window (shorter
    than the sequences), multi-query attention and LoRA adapters on every projection
    (B made non-zero, so they change the outputs), on one device."""
    arch = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, model_type="mistral", sliding_window=5)
    weights = random_hf_weights(arch, seed=3)
    lora = LoraOptions(rank=2, alpha=2.0, targets=LORA_TARGETS)
    model = build_model(arch, ModelOptions(scan_layers=False, lora=lora), get_tensor=weights.__getitem__)
    rng = np.random.default_rng(4)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1].endswith("_lora_b"):
            var.set_value(jnp.asarray(0.5 * rng.standard_normal(var.shape), jnp.float32))
    rng = np.random.default_rng(2)
    batch = [[int(t) for t in rng.integers(0, 64, n)] for n in (7, 3)]
    ref, gap = reference_greedy(model, batch, 6, width=16)
    assert gap > MIN_GAP
    gen = generate(model, batch, GenerationConfig(max_new_tokens=6, eos_ids=()))
    np.testing.assert_array_equal(gen.tokens, ref)


def test_qwen3_qk_norm_cache_path_matches_uncached_forward():
    """Qwen3's q/k norms are applied on the cache path as on the whole-sequence forward
    (scanned layers, head_dim 12 != 32 / 4)."""
    arch = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, model_type="qwen3")
    weights = random_hf_weights(arch, seed=5)
    model = build_model(arch, ModelOptions(scan_layers=True), get_tensor=weights.__getitem__)
    rng = np.random.default_rng(6)
    batch = [[int(t) for t in rng.integers(0, 64, n)] for n in (6, 4)]
    ref, gap = reference_greedy(model, batch, 6, width=16)
    assert gap > MIN_GAP
    gen = generate(model, batch, GenerationConfig(max_new_tokens=6, eos_ids=()))
    np.testing.assert_array_equal(gen.tokens, ref)


# --------------------------------------------------------------------------- #
# prompts and the command line
# --------------------------------------------------------------------------- #
def test_prompts_are_tokenized_as_the_data_pipeline_does():
    """A conversational and a standard demo prompt get the pipeline's prompt ids."""
    from mmpo_jax.data import formats
    from mmpo_jax.data.builtin import load_demo_rows
    from mmpo_jax.data.tokenizers import load_tokenizer, special_ids

    tok = load_tokenizer("builtin:tiny")
    special = special_ids(tok)
    for form in ("conversational", "standard"):
        row = load_demo_rows("test", form)[0]
        batch = {k: [row[k]] for k in ("prompt", "chosen", "rejected")}
        pipeline = formats.tokenize_records(batch, tok, "conversational" if form == "conversational" else "standard",
                                            special)
        assert tokenize_prompts(tok, [row["prompt"]]) == [pipeline["prompt_ids"][0]]
    conv = tokenize_prompts(tok, [load_demo_rows("test", "conversational")[0]["prompt"]])[0]
    assert tok.decode(conv).endswith("<|assistant|>\n")  # the generation prompt
    with pytest.raises(Exception, match="prompt 0: 'prompt' must be a string"):
        tokenize_prompts(tok, [{"text": "hi"}])


def _template_ids(tok, messages):
    """The chat template's ids, by transformers directly (an independent computation)."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _without_template(tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


def test_string_prompts_follow_the_prompt_format():
    """auto / chat: a string is the one-user-message conversation through the template;
    raw (the library default, which win_rate relies on): the text's own ids; auto
    without a template: raw; chat without one: a UserError."""
    from mmpo_jax.commands.generate import PROMPT_FORMATS as CLI_FORMATS
    from mmpo_jax.data.tokenizers import load_tokenizer
    from mmpo_jax.errors import UserError
    from mmpo_jax.eval.generate import PROMPT_FORMATS

    tok = load_tokenizer("builtin:tiny")
    text = "Once upon a time"
    as_chat = _template_ids(tok, [{"role": "user", "content": text}])
    raw = list(tok(text)["input_ids"])
    assert as_chat != raw and tok.decode(as_chat).endswith("<|assistant|>\n")
    assert tokenize_prompts(tok, [text], prompt_format="auto") == [as_chat]
    assert tokenize_prompts(tok, [text], prompt_format="chat") == [as_chat]
    assert tokenize_prompts(tok, [text], prompt_format="raw") == [raw]
    assert tokenize_prompts(tok, [text]) == [raw]  # the library default: today's ids
    messages = [{"role": "user", "content": "Hi"}]
    for fmt in PROMPT_FORMATS:  # message lists: the template whatever the format
        assert tokenize_prompts(tok, [text, messages], prompt_format=fmt)[1] == _template_ids(tok, messages)
    plain = _without_template(tok)
    assert tokenize_prompts(plain, [text], prompt_format="auto") == [raw]
    with pytest.raises(UserError, match="prompt format 'chat': the tokenizer has no chat template"):
        tokenize_prompts(plain, [text], prompt_format="chat")
    assert CLI_FORMATS == PROMPT_FORMATS


def test_cli_prompt_format(tmp_path, capsys):
    """--prompt-format is documented in --help, and chat with a template-less tokenizer
    is a one-line error naming the option and the tokenizer."""
    from mmpo_jax.data.tokenizers import load_tokenizer

    with pytest.raises(SystemExit):
        _cli(["generate", "--help"], capsys)
    help_text = capsys.readouterr().out
    assert "--prompt-format {auto,chat,raw}" in help_text
    tok_dir = tmp_path / "plain_tok"
    _without_template(load_tokenizer("builtin:tiny")).save_pretrained(tok_dir)
    assert not getattr(load_tokenizer(str(tok_dir)), "chat_template", None)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Once upon a time"}\n')
    code, _, err = _cli(["generate", TINY, "--prompts", str(prompts), "--prompt-format", "chat",
                         f"data.tokenizer={tok_dir}"], capsys)
    assert code == 2 and "--prompt-format chat" in err and "no chat template" in err and str(tok_dir) in err


def _cli(args, capsys):
    from mmpo_jax.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_errors_name_the_bad_value(tmp_path, capsys):
    code, _, err = _cli(["generate", TINY, "--prompts", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "no such file" in err and "nope.jsonl" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n\n{"question": "b"}\n')
    code, _, err = _cli(["generate", TINY, "--prompts", str(bad)], capsys)
    assert code == 2 and "line 3" in err and "no 'prompt' field" in err and "question" in err
    code, _, err = _cli(["generate", TINY, "--prompts", str(bad), "--top-p", "0"], capsys)
    assert code == 2 and "--top-p 0" in err
    code, _, err = _cli(["generate", TINY, "--prompts", str(bad), "--max-new-tokens", "100000000"], capsys)
    assert code == 2 and "--max-new-tokens 100000000: must be in [1, 16777216]" in err


def test_cli_refuses_prompts_and_answers_past_the_models_positions(tmp_path, capsys):
    """A prompt longer than the model's positions, or --max-new-tokens past them, was a
    warning and went on (to allocate a KV cache of that length)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "word " * 80}) + "\n")
    small = ["model.init.max_position_embeddings=48", "data.max_length=40", "data.max_prompt_length=20"]
    code, _, err = _cli(["generate", TINY, "--prompts", str(prompts), "--prompt-format", "raw", *small], capsys)
    assert code == 2 and "line 2: the prompt is" in err and "the model reads 48 positions" in err, err
    prompts.write_text(json.dumps({"prompt": "short"}) + "\n")
    code, _, err = _cli(["generate", TINY, "--prompts", str(prompts), "--prompt-format", "raw",
                         "--max-new-tokens", "60", *small], capsys)
    assert code == 2 and "--max-new-tokens 60" in err and "use --max-new-tokens <= " in err, err


def test_cli_end_to_end(tiny, tmp_path, capsys):
    """An exported checkpoint (model.path) on demo preference rows and a string prompt:
    JSONL with every input field, `response` and `num_tokens`, in the file's order, the
    responses being the decoded greedy tokens of `generate`."""
    from mmpo_jax.data.builtin import load_demo_rows
    from mmpo_jax.data.tokenizers import load_tokenizer
    from mmpo_jax.models.hf_export import export_hf

    model, arch = tiny[0], tiny[1]
    tok = load_tokenizer("builtin:tiny")
    ckpt = export_hf(model, arch, tok, tmp_path / "ckpt")
    rows = load_demo_rows("test", "conversational")[:2] + [{"prompt": "Once upon a time", "id": "s"}]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "gen.jsonl"
    code, stdout, err = _cli(["generate", TINY, "--prompts", str(prompts_file), "--out", str(out),
                              "--max-new-tokens", str(N_NEW), "--batch-size", "2", f"model.path={ckpt}"], capsys)
    assert code == 0, err
    assert stdout == "" and "3/3 prompts" in err
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 3
    # the CLI's default --prompt-format auto: the string prompt as a user message of the template
    ids = tokenize_prompts(tok, [r["prompt"] for r in rows], prompt_format="auto")
    assert ids[2] == _template_ids(tok, [{"role": "user", "content": "Once upon a time"}])
    gen = generate(model, ids, GenerationConfig(max_new_tokens=N_NEW, eos_ids=(tok.eos_token_id,),
                                                pad_id=tok.pad_token_id))
    for j, (row, rec) in enumerate(zip(rows, written)):
        assert {k: rec[k] for k in row} == row  # every input field, unchanged
        assert rec["num_tokens"] == gen.num_tokens[j]
        assert rec["response"] == tok.decode(gen.response_ids(j), skip_special_tokens=True)
        assert isinstance(rec["response"], str) and rec["num_tokens"] >= 1
