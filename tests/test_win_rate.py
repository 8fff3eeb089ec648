"""The judge-based win rate (`mmpo_jax.eval.win_rate`, `mmpo-jax eval --win-rate`).

The counting is checked on hand-made verdicts; the judge half on real demo test rows
with responses built from the rows' own answers (each checked with the judge first);
the whole path on a tiny random model, where the policy is its own reference, so every
prompt must be a tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpo_jax.data.builtin import load_demo_rows
from mmpo_jax.data.demo_judge import judge
from mmpo_jax.errors import UserError
from mmpo_jax.eval.win_rate import KEYS, judge_win_rate, judged_rows, outcome, prefixed, win_rate

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# the configs/tiny.yaml architecture made smaller: the CLI test compiles little
SMALL = ["model.init.num_hidden_layers=1", "model.init.hidden_size=32", "model.init.intermediate_size=64",
         "train.eval_batches=1"]


# --------------------------------------------------------------------------- #
# Counting
# --------------------------------------------------------------------------- #
def test_win_rate_of_hand_made_verdicts():
    wins = win_rate([True] * 3, [False] * 3)
    assert wins == {"win_rate": 1.0, "judge_accuracy": 1.0, "reference_judge_accuracy": 0.0,
                    "wins": 3.0, "ties": 0.0, "losses": 0.0, "n": 3.0}
    assert win_rate([False] * 3, [True] * 3)["win_rate"] == 0.0
    # ties both ways: both right, both wrong
    ties = win_rate([True, False, True, False], [True, False, True, False])
    assert ties["win_rate"] == 0.5 and ties["ties"] == 4.0 and ties["judge_accuracy"] == 0.5
    # 2 wins (0, 4), 2 ties (1, 3), 1 loss (2): (2 + 0.5 * 2) / 5 = 3/5
    mixed = win_rate([True, True, False, False, True], [False, True, True, False, False])
    assert (mixed["wins"], mixed["ties"], mixed["losses"], mixed["n"]) == (2.0, 2.0, 1.0, 5.0)
    assert mixed["win_rate"] == 3 / 5
    assert mixed["judge_accuracy"] == 3 / 5 and mixed["reference_judge_accuracy"] == 2 / 5
    # 1 win, 2 ties, 1 loss over 4: (1 + 1) / 4
    assert win_rate([True, True, False, False], [False, True, False, True])["win_rate"] == 0.5
    assert [outcome(True, False), outcome(False, True), outcome(True, True)] == ["win", "loss", "tie"]
    assert list(prefixed(mixed)) == [f"win_rate/{k}" for k in KEYS]


def test_win_rate_rejects_mismatched_or_empty_verdicts():
    with pytest.raises(ValueError, match="2 policy verdicts but 1 reference"):
        win_rate([True, False], [True])
    with pytest.raises(ValueError, match="no verdicts"):
        win_rate([], [])


# --------------------------------------------------------------------------- #
# The judge on real demo rows
# --------------------------------------------------------------------------- #
def _answer(value) -> str:
    """The text of a row's chosen / rejected answer (standard: a string; conversational:
    the assistant message)."""
    return value if isinstance(value, str) else value[-1]["content"]


@pytest.mark.parametrize("form", ["conversational", "standard"])
def test_judge_win_rate_on_demo_rows_with_hand_made_responses(form):
    rows = load_demo_rows("test", form)[:40]
    assert len({r["format"] for r in rows}) >= 5  # several judge rules, not one
    good = [_answer(r["chosen"]) for r in rows]
    bad = [_answer(r["rejected"]) for r in rows]
    # the premise: the judge takes each chosen answer and refuses each rejected one
    assert all(judge(r, g) for r, g in zip(rows, good))
    assert not any(judge(r, b) for r, b in zip(rows, bad))

    n = float(len(rows))
    assert judge_win_rate(rows, good, bad) == {
        "win_rate": 1.0, "judge_accuracy": 1.0, "reference_judge_accuracy": 0.0,
        "wins": n, "ties": 0.0, "losses": 0.0, "n": n}
    swapped = judge_win_rate(rows, bad, good)
    assert swapped["win_rate"] == 0.0 and swapped["losses"] == n
    for same in (good, bad):
        identical = judge_win_rate(rows, same, same)
        assert identical["win_rate"] == 0.5 and identical["ties"] == n
    # half right: the first 10 chosen, the rest rejected, against all rejected
    half = good[:10] + bad[10:]
    mixed = judge_win_rate(rows, half, bad)
    assert mixed["wins"] == 10.0 and mixed["win_rate"] == (10 + 0.5 * (n - 10)) / n


def test_judged_rows_needs_the_judge_fields(tmp_path):
    from mmpo_jax.config import load_config

    cfg = load_config(TINY, ["data.test_files=builtin:demo"])
    rows, where = judged_rows(cfg, limit=5)
    assert len(rows) == 5 and rows[0]["id"] == "test-00000" and "line 1" in where[0]

    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Hi", "chosen": " a", "rejected": " b"}) + "\n")
    cfg = load_config(TINY, [f"data.test_files={plain}"])
    with pytest.raises(UserError, match=r"plain.jsonl' line 1: no 'format', 'answer', 'options' field"):
        judged_rows(cfg)
    with pytest.raises(UserError, match="--win-rate-limit=-1"):
        judged_rows(cfg, limit=-1)
    cfg = load_config(TINY, ["data.test_files=null"])
    with pytest.raises(UserError, match="set data.test_files"):
        judged_rows(cfg)


# --------------------------------------------------------------------------- #
# The command line
# --------------------------------------------------------------------------- #
def test_eval_cli_win_rate_of_an_initial_model_is_all_ties(capsys, tmp_path):
    from mmpo_jax.cli import main

    generations = tmp_path / "gen.jsonl"
    assert main(["eval", TINY, "--win-rate", "--win-rate-limit", "4", "--max-new-tokens", "8", "--json",
                 "--save-generations", str(generations), *SMALL]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert {f"win_rate/{k}" for k in KEYS} <= set(out) and "eval/loss" in out
    # at init the policy is its reference: the same greedy answers, so 4 ties exactly
    assert out["win_rate/win_rate"] == 0.5
    assert (out["win_rate/ties"], out["win_rate/wins"], out["win_rate/losses"], out["win_rate/n"]) == (4, 0, 0, 4)
    assert out["win_rate/judge_accuracy"] == out["win_rate/reference_judge_accuracy"]
    assert "reference: the run's frozen reference (the initial policy" in captured.err
    records = [json.loads(line) for line in generations.read_text().splitlines()]
    assert [r["id"] for r in records] == ["test-00000", "test-00001", "test-00002", "test-00003"]
    assert all(r["policy_response"] == r["reference_response"] and r["outcome"] == "tie" for r in records)


def test_eval_cli_win_rate_option_errors(capsys):
    from mmpo_jax.cli import main

    # checked before any model is built
    assert main(["eval", TINY, "--save-generations", "x.jsonl"]) == 2
    assert "--save-generations needs --win-rate" in capsys.readouterr().err
    assert main(["eval", TINY, "--win-rate", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens=0: must be >= 1" in capsys.readouterr().err
    assert main(["eval", TINY, "--win-rate", "--win-rate-limit", "-2"]) == 2
    assert "--win-rate-limit=-2" in capsys.readouterr().err
