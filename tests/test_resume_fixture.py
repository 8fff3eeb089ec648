"""Run directories written by an earlier version (tests/fixtures/run_before_loss_registry:
2-step runs of a 1-layer model, MMPO and SimPO with its default beta, made before the
loss registry) resume with the config they were trained with: no difference but the two
keys the resume changes, the next step trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmpo_jax.cli import main
from mmpo_jax.train.checkpoint import saved_config_text
from mmpo_jax.train.run_config import config_differences

FIXTURES = Path(__file__).parent / "fixtures" / "run_before_loss_registry"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mmpo", "simpo"])
def test_an_old_run_directory_resumes_without_a_config_difference(name, tmp_path, capsys):
    run = tmp_path / name
    shutil.copytree(FIXTURES / name, run)
    saved = saved_config_text(run / "checkpoints" / "2")
    assert main(["train", str(run / "config.yaml"), f"train.output_dir={run}", "train.max_steps=3"]) == 0
    out = capsys.readouterr()
    assert "resum" in out.out.lower() and "step 2" in out.out, out.out
    # the only differences are the two this resume asks for (a longer run, another place)
    records = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert [sorted(c.split(" ")[0] for c in r["changes"]) for r in records] == [["train.max_steps",
                                                                                "train.output_dir"]]
    warned = [line for line in out.out.splitlines() if "differs" in line]
    assert len(warned) == 1 and "loss." not in warned[0], warned
    now = (run / "config.yaml").read_text()
    assert config_differences(saved, now, ignore=("train.output_dir", "train.max_steps")) == []
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and 2 in steps


def test_a_key_the_old_config_lacks_differs_only_away_from_its_default():
    saved = (FIXTURES / "mmpo" / "config.yaml").read_text()
    assert "sync_reference" not in saved  # written before TR-DPO existed
    now = saved.replace("model:\n", "model:\n  sync_reference: false\n", 1)
    assert config_differences(saved, now) == []
    changed = saved.replace("model:\n", "model:\n  sync_reference: true\n", 1)
    assert config_differences(saved, changed) == ["model.sync_reference (False -> True)"]
