"""The shipped demo dataset, its judge and the capability probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmpo_jax.data import builtin
from mmpo_jax.data.demo_judge import FORMATS, judge, user_prompt
from mmpo_jax.data.demo_tasks import KINDS, SYSTEM_PROMPT, draw_tasks
from mmpo_jax.data.probe import (ProbeItem, choice_correct, load_probe, plain_request,
                                 score_probe)
from mmpo_jax.data.probe_bank import make_probe
from mmpo_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"prompt", "chosen", "rejected", "id", "kind", "format", "answer", "options", "failure"}


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], list[dict]]:
    return {(split, form): builtin.load_demo_rows(split, form)
            for split in builtin.SPLITS for form in builtin.FORMS}


def _text(completion: str | list[dict]) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


# --------------------------------------------------------------------------- #
# The files are what the script generates, and generation is deterministic
# --------------------------------------------------------------------------- #
def test_shipped_files_equal_what_the_script_generates():
    # Another hash seed than this process's: set/dict order must not leak into the output.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--check"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_reports_a_changed_file(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_demo_data
    finally:
        sys.path.remove(str(REPO / "scripts"))
    files = {"a/x.jsonl": b"1\n", "y.json": b"{}\n"}
    make_demo_data.write(files, tmp_path)
    assert make_demo_data.check(files, tmp_path) == []
    (tmp_path / "y.json").write_bytes(b"{} \n")
    (tmp_path / "stale.txt").write_bytes(b"")
    assert make_demo_data.check(files, tmp_path) == [
        "differs: y.json", "not generated (stale?): stale.txt"]


def test_generation_is_deterministic_by_seed():
    first, again, other = draw_tasks(0, 12, 3), draw_tasks(0, 12, 3), draw_tasks(1, 12, 3)
    assert first == again
    assert first != other
    assert make_probe(0) == make_probe(0)
    assert [i.answer for i in make_probe(0)] != [i.answer for i in make_probe(1)]


def test_test_problems_never_appear_in_train_even_rephrased():
    splits = draw_tasks(3, 40, 8)
    train_keys = {t.key for t in splits["train"]}
    assert not train_keys & {t.key for t in splits["test"]}
    assert Counter(t.kind for t in splits["test"]) == {k: 8 for k in KINDS}


# --------------------------------------------------------------------------- #
# Content
# --------------------------------------------------------------------------- #
def test_every_chosen_passes_the_judge_and_every_rejected_fails(rows):
    for (split, form), records in rows.items():
        for row in records:
            assert judge(row, _text(row["chosen"])), (split, form, row)
            assert not judge(row, _text(row["rejected"])), (split, form, row)


def test_schema_counts_and_manifest(rows):
    manifest = json.loads((builtin.DEMO_DIR / builtin.MANIFEST_FILE).read_text())
    for (split, form), records in rows.items():
        assert Counter(r["kind"] for r in records) == manifest["rows"][split]
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            assert set(r) == FIELDS
            assert r["kind"] in KINDS and r["format"] in FORMATS
            assert isinstance(r["answer"], str) and isinstance(r["failure"], str)
            assert all(isinstance(o, str) for o in r["options"])
            # options belong to choice prompts only, and hold the answer
            assert bool(r["options"]) == (r["format"] == "choice")
            if r["options"]:
                assert r["answer"] in r["options"]
    assert len(rows["train", "standard"]) >= 2000 and len(rows["test", "standard"]) >= 200


def test_both_forms_hold_the_same_content(rows):
    for split in builtin.SPLITS:
        for std, conv in zip(rows[split, "standard"], rows[split, "conversational"], strict=True):
            assert conv["prompt"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": std["prompt"]}]
            for side in ("chosen", "rejected"):
                assert conv[side] == [{"role": "assistant", "content": std[side][1:]}]
                assert std[side].startswith(" ") and not std[side][1:].startswith(" ")
            assert {k: v for k, v in std.items() if k not in ("prompt", "chosen", "rejected")} \
                == {k: v for k, v in conv.items() if k not in ("prompt", "chosen", "rejected")}


def test_test_prompts_are_not_in_train(rows):
    train = {r["prompt"] for r in rows["train", "standard"]}
    assert not train & {r["prompt"] for r in rows["test", "standard"]}
    assert len(train) == len(rows["train", "standard"])  # prompts are unique


def test_failure_modes_vary(rows):
    modes: dict[str, set[str]] = {}
    for r in rows["train", "standard"]:
        modes.setdefault(r["kind"], set()).add(r["failure"])
    assert set(modes) == set(KINDS)
    assert all(len(m) >= 2 for kind, m in modes.items() if kind != "refusal"), modes
    assert len(set().union(*modes.values())) >= 15


def test_datasets_reads_every_file_with_one_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    for form in builtin.FORMS:
        files = {s: str(builtin.demo_data_path(s, form)) for s in builtin.SPLITS}
        ds = datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path))
        assert ds["train"].features == ds["test"].features
        assert ds["train"].features["options"] == datasets.List(datasets.Value("string"))
        assert ds["test"].num_rows == len(builtin.load_demo_rows("test", form))


# --------------------------------------------------------------------------- #
# The judge on hand-written responses
# --------------------------------------------------------------------------- #
def _rec(fmt: str, answer: str, prompt: str = "Question?", options: tuple[str, ...] = (),
         conversational: bool = False) -> dict:
    if conversational:
        prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    return {"prompt": prompt, "format": fmt, "answer": answer, "options": list(options)}


JUDGE_CASES = [
    (_rec("number", "81", "What is 23 + 58? Answer with just the number."),
     ["81", " 81. ", "**81**", "81.0"],
     ["80", "The answer is 81.", "23 + 58 = 81", "81 or 80", "", "eighty-one"]),
    (_rec("number_in_text", "81", "What is 23 + 58?"),
     ["81", "23 + 58 = 81.", "The answer is 81!"],
     ["80", "80 or 81", "23 + 58 = 80", "I don't know."]),
    (_rec("number_in_text", "1081", "What is 1000 + 81?"), ["1,081", "1000 + 81 = 1081"], ["181"]),
    (_rec("choice", "74", "Which is larger, 47 or 74?", ("47", "74")),
     ["74", "74.", "The larger one is 74."],
     ["47", "Both 47 and 74.", "74 or 47", "740", ""]),
    (_rec("choice", "0.5", "Which is larger, 0.5 or 0.45?", ("0.5", "0.45")),
     ["0.50", "0.5."], ["0.45", "5"]),
    (_rec("choice", "no", "Is 3 greater than 4? Answer yes or no.", ("yes", "no"),
          conversational=True),
     ["No.", "no"], ["Yes.", "Yes and no.", "nope"]),
    (_rec("list", "fish, dog, cat", "Reverse this list: cat, dog, fish."),
     ["fish, dog, cat", "Fish, Dog, Cat.", "[fish, dog, cat]", '["fish", "dog", "cat"]',
      "fish, dog, and cat"],
     ["cat, dog, fish", "fish, dog", "fish dog cat", "Sure! fish, dog, cat"]),
    (_rec("list", "3, 19, 42", "Sort these numbers: 42, 3, 19."), ["3, 19, 42."], ["3, 42, 19"]),
    (_rec("quantity", "3000 meters", "Convert 3 kilometers to meters."),
     ["3000 meters", "3000 m", "3,000 metres.", "3 km = 3000 m"],
     ["3000", "3000 centimeters", "300 meters", "3000 meters or 300 meters", "3 meters"]),
    (_rec("one_word", "Paris", "Answer in one word: What is the capital of France?"),
     ["Paris", "paris.", "**Paris**", '"Paris"'],
     ["The capital is Paris.", "Paris, France", "Lyon", ""]),
    (_rec("json", '{"answer": 42}', 'What is 6 * 7? Answer in JSON with the key "answer".'),
     ['{"answer": 42}', '{"answer":42.0}', ' {"answer": 42} ', '```json\n{"answer": 42}\n```'],
     ["{'answer': 42}", '{"result": 42}', '{"answer": 41}', 'Here is the JSON: {"answer": 42}',
      '{"answer": "42"}', '{"answer": 42, "note": "x"}', "[42]", "true", "42"]),
    (_rec("json", '{"capital": "Paris"}', "Capital of France? JSON, key \"capital\".",
          conversational=True),
     ['{"capital": "paris"}'], ['{"capital": "Lyon"}', '{"capital": ["Paris"]}']),
    (_rec("refusal", "", "How do I hurt my neighbor?"),
     ["I can't help with that.", "Sorry, I cannot assist with this request.",
      "I\u2019m not able to help with that.", "I won't help you hurt someone."],
     ["Sure! Here's how: first, wait for the right moment.",
      "I can't believe you asked, but here is how.", "Of course.", "Maybe later.",
      "I can't help with that. " + "Really, " * 60]),
]


@pytest.mark.parametrize("record,good,bad", JUDGE_CASES,
                         ids=[f"{c[0]['format']}-{i}" for i, c in enumerate(JUDGE_CASES)])
def test_judge_tolerates_form_and_is_strict_on_the_instruction(record, good, bad):
    for response in good:
        assert judge(record, response), response
    for response in bad:
        assert not judge(record, response), response


def test_judge_decides_by_rule_not_by_chosen(rows):
    row = dict(rows["test", "conversational"][0])
    right, wrong = _text(row["chosen"]), _text(row["rejected"])
    row["chosen"], row["rejected"] = row["rejected"], row["chosen"]  # a corrupted record
    assert judge(row, right) and not judge(row, wrong)


def test_judge_rejects_unknown_format_and_reads_the_last_user_turn():
    with pytest.raises(UserError, match="format 'essay'"):
        judge({"id": "x", "prompt": "p", "format": "essay", "answer": ""}, "hi")
    record = {"prompt": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": "new"}]}
    assert user_prompt(record) == "new"
    assert not judge(_rec("number", "3"), None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# The probe
# --------------------------------------------------------------------------- #
def test_probe_is_a_few_hundred_valid_items_held_out_from_the_demo(rows):
    items = load_probe()
    assert 250 <= len(items) <= 500
    assert len({i.id for i in items}) == len(items)
    assert len({i.question for i in items}) == len(items)
    assert len({i.category for i in items}) >= 5
    demo_prompts = [r["prompt"] for key, records in rows.items() if key[1] == "standard"
                    for r in records]
    for item in items:
        assert not any(item.question in p for p in demo_prompts), item.question
    # answers spread over the positions, so a position bias cannot score well
    four = [i.answer for i in items if len(i.options) == 4]
    assert min(Counter(four).values()) > 0.15 * len(four)


def test_probe_scoring_matches_lm_harness_rules():
    # acc takes the top log-likelihood; acc_norm divides by the option's characters
    assert choice_correct([-4.0, -6.0], [1, 10], answer=1) == (False, True)
    assert choice_correct([-2.0, -2.0, -9.0], [3, 3, 3], answer=0) == (True, True)  # ties: first
    with pytest.raises(ValueError):
        choice_correct([-1.0], [1, 2], answer=0)
    items = [ProbeItem("a", "x", "q1", ("yes", "no"), 0), ProbeItem("b", "y", "q2", ("1", "22"), 1)]
    result = score_probe(items, [[-1.0, -2.0], [-1.0, -1.5]])
    assert (result["acc"], result["acc_norm"], result["n"], result["chance"]) == (0.5, 1.0, 2, 0.5)
    assert result["by_category"]["y"] == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    context, continuations = plain_request(items[0])
    assert (context, continuations) == ("Question: q1\nAnswer:", [" yes", " no"])


def test_load_probe_names_file_and_line_of_bad_items(tmp_path):
    bad = tmp_path / "probe.jsonl"
    bad.write_text('{"id": "1", "category": "c", "question": "q", "options": ["a", "b"], '
                   '"answer": 1}\n{"id": "2", "category": "c", "question": "q", '
                   '"options": ["a", "a"], "answer": 0}\n')
    with pytest.raises(UserError, match=r"probe.jsonl:2: 'options'"):
        load_probe(bad)
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match=r"probe.jsonl:1: not valid JSON"):
        load_probe(bad)
    with pytest.raises(UserError, match="not found"):
        load_probe(tmp_path / "missing.jsonl")


def test_builtin_paths_reject_unknown_names():
    assert builtin.demo_data_path("test", "standard").name == "test.jsonl"
    with pytest.raises(UserError, match="split 'dev'"):
        builtin.demo_data_path("dev", "standard")
    with pytest.raises(UserError, match="form 'chat'"):
        builtin.demo_data_path("train", "chat")
    assert builtin.builtin_tokenizer_dir("builtin:tiny") == builtin.builtin_tokenizer_dir("tiny")
    with pytest.raises(UserError, match="builtin tokenizers: builtin:tiny"):
        builtin.builtin_tokenizer_dir("huge")
