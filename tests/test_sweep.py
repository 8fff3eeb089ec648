"""Sweeps (`mmpo_jax.sweep`, `mmpo-jax sweep`): the grid, the names, the summary, a real run.

The pure parts (grid expansion, names, summary rows, the Figure-1 plot) use hand-made
inputs. One real sweep (module fixture) trains two 1-step runs of a tiny model (mmpo,
dpo) with the win rate, plus one run whose overrides are invalid; the tests then read
what it wrote and run it again, which must train nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from pathlib import Path

import pytest

from mmpo_jax.errors import UserError
from mmpo_jax.sweep_runs import (
    Axis,
    Outcome,
    RunSpec,
    expand,
    parse_also,
    parse_grid,
    split_values,
)
from mmpo_jax.sweep_report import plot_win_rate_vs_capability, summary_table

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- #
# Grid and names (no training)
# --------------------------------------------------------------------------- #
def test_parse_grid_and_also():
    assert parse_grid("loss.name=[mmpo,dpo,simpo]") == Axis("loss.name", ("mmpo", "dpo", "simpo"))
    assert parse_grid("loss.beta=[0.01, 0.1 ,1.0]") == Axis("loss.beta", ("0.01", "0.1", "1.0"))
    assert parse_grid("loss.beta=0.5") == Axis("loss.beta", ("0.5",))
    assert split_values("[[q,v],[q,k,v],{a: 1, b: 2}]") == ["[q,v]", "[q,k,v]", "{a: 1, b: 2}"]
    assert parse_also("loss.name=mmpo loss.aux_weight=0") == (("loss.name", "mmpo"), ("loss.aux_weight", "0"))
    for bad, match in [("beta=[1,2]", "expected section.key=value"),
                       ("loss.beta", "expected section.key=value"),
                       ("loss.beta=[0.1,,0.2]", "empty value"),
                       ("loss.beta=[0.1,0.1]", "repeated"),
                       ("train.output_dir=[a,b]", "sets train.output_dir itself")]:
        with pytest.raises(UserError, match=match):
            parse_grid(bad)
    with pytest.raises(UserError, match="a key is given twice"):
        parse_also("loss.beta=1 loss.beta=2")
    with pytest.raises(UserError, match="at least one"):
        parse_also("  ")


def test_a_grid_over_dpo_loss_types_and_mixtures():
    from mmpo_jax.config import load_config

    runs = expand([parse_grid("loss.name=[dpo]"), parse_grid("loss.loss_type=[sigmoid,ipo,[sigmoid,sft]]")])
    assert [r.name for r in runs] == ["dpo-sigmoid", "dpo-ipo", "dpo-sigmoid_sft"]
    kinds = [load_config(None, r.override_list()).loss.loss_type for r in runs]
    assert kinds == ["sigmoid", "ipo", ["sigmoid", "sft"]]


def test_expand_grid_with_ablation_runs_and_names():
    axes = [parse_grid("loss.name=[mmpo,dpo,simpo]"), parse_grid("loss.beta=[0.01,0.05,0.1,0.5,1.0]")]
    runs = expand(axes, [parse_also("loss.name=mmpo loss.aux_weight=0")])
    names = [r.name for r in runs]
    # 15 grid runs, the first axis slowest, then one ablation run per beta (the dpo and
    # simpo combinations become the same mmpo runs)
    assert len(runs) == 20 and len(set(names)) == 20
    assert names[:6] == ["mmpo-beta0.01", "mmpo-beta0.05", "mmpo-beta0.1", "mmpo-beta0.5", "mmpo-beta1.0",
                         "dpo-beta0.01"]
    assert names[15:] == [f"mmpo-beta{b}-aux_weight0" for b in ("0.01", "0.05", "0.1", "0.5", "1.0")]
    assert runs[17].override_list() == ["loss.name=mmpo", "loss.beta=0.1", "loss.aux_weight=0"]
    assert runs[17].value("loss.aux_weight") == "0" and runs[17].value("loss.gamma") is None

    # loss.name comes first in a name whatever the axis order; text values get key_value
    runs = expand([parse_grid("loss.normalize=[minmax,none]"), parse_grid("loss.name=[mmpo]")])
    assert [r.name for r in runs] == ["mmpo-normalize_minmax", "mmpo-normalize_none"]
    # an --also equal to a grid run adds nothing
    assert len(expand([parse_grid("loss.beta=[0.1,0.2]")], [parse_also("loss.beta=0.2")])) == 2
    # no grid: one run of the config as it is, or the --also overrides alone
    assert [r.name for r in expand([])] == ["base"]
    assert [r.name for r in expand([], [parse_also("loss.name=dpo")])] == ["base", "dpo"]
    # two keys with the same last part are named in full
    runs = expand([parse_grid("model.dropout=[0.0]"), parse_grid("model.lora.dropout=[0.1]")])
    assert runs[0].name == "model_dropout0.0-model_lora_dropout0.1"
    with pytest.raises(UserError, match="two runs get the name 'beta0.1'"):
        expand([Axis("loss.beta", ("0.1", "0.1 "))])
    with pytest.raises(UserError, match="key loss.beta is given twice"):
        expand([parse_grid("loss.beta=[1]"), parse_grid("loss.beta=[2]")])


def _record(loss: dict, metrics: dict, steps: int = 2, seconds: float = 3.25) -> dict:
    return {"loss": loss, "metrics": metrics, "steps": steps, "seconds": seconds}


MMPO = {"name": "mmpo", "beta": 0.1, "aux_weight": 0.0, "normalize": "minmax", "entropy_weight": 0.0,
        "entropy_estimator": "token"}


def test_summary_rows_by_hand():
    outcomes = [
        Outcome(RunSpec("mmpo-beta0.1", (("loss.name", "mmpo"), ("loss.beta", "0.1"), ("optim.learning_rate", "1e-4"))),
                "ok", _record(MMPO, {"eval/loss": 0.123456, "win_rate/win_rate": 0.625, "capability/acc": 0.5,
                                     "eval/rewards/accuracies": 2 / 3})),
        Outcome(RunSpec("dpo-beta0.1", (("loss.name", "dpo"), ("loss.beta", "0.1"))), "ok",
                _record({**MMPO, "name": "dpo", "beta": 5e-7}, {"eval/loss": float("nan")})),
        Outcome(RunSpec("mmpo-beta-1", (("loss.name", "mmpo"), ("loss.beta", "-1"))),
                "failed: loss.beta=-1.0: must be > 0"),
    ]
    columns, rows = summary_table(outcomes)
    for name in ("run", "loss", "beta", "aux_weight", "normalize", "entropy_weight", "entropy_estimator",
                 "win_rate", "judge_accuracy", "capability_acc", "capability_acc_norm",
                 "eval_rewards_accuracies", "eval_loss", "steps", "seconds", "status"):
        assert name in columns
    # a swept key without its own column gets one, beside the loss's
    assert columns.index("optim.learning_rate") == columns.index("entropy_estimator") + 1
    assert rows[0] == {**rows[0], "loss": "mmpo", "beta": "0.1", "aux_weight": "0", "eval_loss": "0.1235",
                       "win_rate": "0.6250", "capability_acc": "0.5000", "eval_rewards_accuracies": "0.6667",
                       "judge_accuracy": "", "steps": "2", "seconds": "3.2", "optim.learning_rate": "1e-4"}
    # the MMPO-only keys are blank for DPO; NaN is blank; small betas stay exact
    assert rows[1]["aux_weight"] == rows[1]["normalize"] == rows[1]["eval_loss"] == ""
    assert rows[1]["beta"] == "5e-07"
    # a failed run: its status and what its overrides said
    assert rows[2]["status"].startswith("failed: loss.beta=-1.0")
    assert (rows[2]["loss"], rows[2]["beta"], rows[2]["eval_loss"]) == ("mmpo", "-1", "")


def test_figure1_plot_by_hand(tmp_path):
    outcomes, rows = [], []
    for loss, betas in (("mmpo", (0.1, 0.5)), ("dpo", (0.1, 0.5))):
        for k, beta in enumerate(betas):
            spec = RunSpec(f"{loss}-beta{beta}", (("loss.name", loss), ("loss.beta", str(beta))))
            outcomes.append(Outcome(spec, "ok"))
            rows.append({"loss": loss, "beta": str(beta), "win_rate": f"{0.5 + 0.1 * k}",
                         "capability_acc": f"{0.3 + 0.05 * k}", "eval_loss": "1.0", "eval_rewards_accuracies": "0.5"})
    path = tmp_path / "fig1.png"
    plot_win_rate_vs_capability(outcomes, rows, tmp_path, path)
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


# --------------------------------------------------------------------------- #
# A real sweep
# --------------------------------------------------------------------------- #
ARGS = ["model.init.num_hidden_layers=1", "model.init.hidden_size=32", "model.init.intermediate_size=64",
        "train.max_steps=1", "train.eval_batches=1", "train.eval_every=0", "train.save_every=0",
        "--grid", "loss.name=[mmpo,dpo]", "--also", "loss.name=mmpo loss.beta=-1",
        "--win-rate", "--win-rate-limit", "2", "--max-new-tokens", "2"]


def _sweep(out: Path) -> tuple[int, str, float]:
    from mmpo_jax.cli import main

    buf = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = main(["sweep", TINY, *ARGS, "--out", str(out)])
    return code, buf.getvalue(), time.perf_counter() - start


def _summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    code, text, _ = _sweep(out)
    return out, code, text


@pytest.mark.slow
def test_sweep_trains_evaluates_and_summarises(sweep):
    out, code, text = sweep
    assert "[1/3] mmpo: training ..." in text and "[2/3] dpo: training ..." in text
    assert "[1/3] mmpo: done in" in text and "win rate 0.5000" in text
    rows = _summary(out)
    assert [r["run"] for r in rows] == ["mmpo", "dpo", "mmpo-beta-1"]
    for r in rows[:2]:
        assert r["status"] == "ok" and r["steps"] == "1" and float(r["seconds"]) > 0
        assert r["eval_loss"] and r["eval_rewards_accuracies"] and r["win_rate"] and r["judge_accuracy"]
        assert r["capability_acc"] == ""  # not asked for
        assert (out / r["run"] / "checkpoints" / "1").is_dir()
        record = json.loads((out / r["run"] / "eval.json").read_text())
        assert record["metrics"]["win_rate/n"] == 2 and record["overrides"]["loss.name"] == r["loss"]
        assert len((out / r["run"] / "generations.jsonl").read_text().splitlines()) == 2
    assert rows[0]["aux_weight"] == "1" and rows[1]["aux_weight"] == ""  # MMPO's key, blank for DPO
    for name in ("win_rate_vs_capability.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name


def test_sweep_records_an_invalid_run_as_failed_and_goes_on(sweep):
    out, code, text = sweep
    assert code == 1  # a run failed
    failed = _summary(out)[2]
    assert failed["status"] == "failed: loss.beta=-1.0: must be > 0"
    assert (failed["loss"], failed["beta"], failed["eval_loss"]) == ("mmpo", "-1", "")
    assert "[3/3] mmpo-beta-1: FAILED: loss.beta=-1.0: must be > 0" in text
    assert not (out / "mmpo-beta-1" / "eval.json").exists()


def test_sweep_again_skips_finished_runs(sweep):
    out, _, _ = sweep
    before = _summary(out)
    written = {f: f.stat().st_mtime_ns for run in ("mmpo", "dpo")
               for f in (out / run / "eval.json", out / run / "generations.jsonl")}
    code, text, _ = _sweep(out)
    assert code == 1
    assert text.count("skipped (finished") == 2 and "training ..." not in text
    # neither re-evaluated nor re-generated: a finished run's files are only read
    assert {f: f.stat().st_mtime_ns for f in written} == written
    after = _summary(out)

    def without_seconds(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert without_seconds(after) == without_seconds(before)


def test_dry_run_checks_every_runs_config(tmp_path, capsys):
    """A misspelt key and a bad value are named under their runs before anything trains;
    nothing is written."""
    from mmpo_jax.cli import main

    out = tmp_path / "sweep"
    code = main(["sweep", TINY, "--grid", "loss.beta=[0.1,-1]", "--also", "loss.nme=dpo",
                 "--out", str(out), "--dry-run"])
    text = capsys.readouterr().out
    assert code == 2
    assert "invalid config: loss.beta=-1.0: must be > 0" in text
    assert text.count("Did you mean 'loss.name'?") == 2  # the two --also runs
    assert "3 of 4 runs have an invalid config" in text
    assert not out.exists()
    assert main(["sweep", TINY, "--grid", "loss.beta=[0.1,1]", "--out", str(out), "--dry-run"]) == 0
    assert "invalid" not in capsys.readouterr().out and not out.exists()
