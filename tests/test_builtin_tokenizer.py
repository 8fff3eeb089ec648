"""The builtin:tiny tokenizer: loads offline, round-trips, renders the chat template as documented."""

from __future__ import annotations

import pytest

from mmpo_jax.data import builtin
from mmpo_jax.data.probe import chat_request, encode_request, load_probe, plain_request
from mmpo_jax.data.tiny_tokenizer import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tok():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a package directory: no hub involved
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(str(builtin.builtin_tokenizer_dir("tiny")))
    return loaded


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The rendering `tiny_tokenizer`'s docstring documents."""
    text = "<|bos|>" + "".join(
        f"<|{m['role']}|>\n{m['content']}" + ("<|eos|>" if m["role"] == "assistant" else "\n")
        for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def test_special_tokens_and_size(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert 1000 <= len(tok) <= 4096
    assert type(builtin.load_builtin_tokenizer()) is type(tok)


TEXTS = ["What is 23 + 58? Answer with just the number.", ' {"answer": 42}', "  two  spaces\n\nand lines\t",
         "na\u00efve caf\u00e9 \u2615 \u65e5\u672c\u8a9e", "Reverse this list: 136, 138, 730.", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_one_bos(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    bare = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[1:] == bare
    assert tok.decode(bare) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_digits_are_single_tokens(tok):
    assert len(tok("90210", add_special_tokens=False)["input_ids"]) == 5


def test_chat_template_renders_as_documented(tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 2 + 4?"}]
    assert tok.apply_chat_template(conv, tokenize=False) == render(conv)
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == render(conv, True)
    assert render(conv[:3]) == ("<|bos|><|system|>\nBe brief.\n<|user|>\nWhat is 2 + 3?\n"
                                "<|assistant|>\n5<|eos|>")
    ids = tok.apply_chat_template(conv[:3], tokenize=True)["input_ids"]
    # one BOS (the template's), and the assistant turn ends with EOS and nothing after it
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_demo_prompts_are_token_prefixes_and_rows_are_short(tok):
    """TRL takes the completion as what follows the prompt's tokens: check that holds for
    every demo row, and that most rows stay under 64 tokens with the chat template."""
    for split in builtin.SPLITS:
        rows = builtin.load_demo_rows(split, "conversational")
        # the real template on a sample, the documented rendering (same text) on every row
        for row in rows[:: max(1, len(rows) // 60)]:
            assert tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False) == \
                render(row["prompt"] + row["chosen"])
        prompts = tok([render(r["prompt"], True) for r in rows], add_special_tokens=False)["input_ids"]
        lengths = []
        for side in ("chosen", "rejected"):
            full = tok([render(r["prompt"] + r[side]) for r in rows],
                       add_special_tokens=False)["input_ids"]
            for p, f in zip(prompts, full):
                assert f[:len(p)] == p and f[-1] == tok.eos_token_id and len(f) > len(p) + 1
            lengths.append([len(f) for f in full])
        longest = [max(pair) for pair in zip(*lengths)]
        assert sum(n < 64 for n in longest) >= 0.9 * len(rows), split
        assert max(longest) <= 128


def test_standard_rows_split_on_a_token_boundary(tok):
    rows = builtin.load_demo_rows("train", "standard")
    prompts = tok([r["prompt"] for r in rows])["input_ids"]
    for side in ("chosen", "rejected"):
        full = tok([r["prompt"] + r[side] for r in rows])["input_ids"]
        assert all(f[:len(p)] == p for p, f in zip(prompts, full))


def test_probe_requests_encode_to_context_plus_continuation(tok):
    items = load_probe()[:40]
    for item in items:
        context, continuations = plain_request(item)
        for cont in continuations:
            ctx_ids, cont_ids = encode_request(tok, context, cont)
            assert ctx_ids[0] == tok.bos_token_id and cont_ids
            assert tok.decode(ctx_ids + cont_ids, skip_special_tokens=True) == context + cont
        context, continuations = chat_request(item, tok, system_prompt="Be brief.")
        assert context == render([{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": item.question}], True)
        ctx_ids, cont_ids = encode_request(tok, context, continuations[0], add_special_tokens=False)
        assert ctx_ids.count(tok.bos_token_id) == 1
        assert tok.decode(cont_ids) == continuations[0]
