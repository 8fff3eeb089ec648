"""A run's length: `train.num_epochs` resolved to steps from the kept pairs (shown at start,
saved as `train.max_steps`, so the same command resumes or finishes with no config
difference), and a resume with a longer run, which recomputes the learning-rate schedule:
the run says so and gives the rates before and after, checked against transformers'
scheduler (what TRL runs)."""

from __future__ import annotations

import json
import math

import pytest

from mmpo_jax import cli
from mmpo_jax.config import load_config
from mmpo_jax.data.batches import steps_per_epoch
from mmpo_jax.train.run_config import epoch_steps

TINY = "configs/tiny.yaml"
QUIET = ["data.test_files=null", "train.eval_every=0", "train.save_every=0", "train.report_to=none",
         "train.max_steps=null"]


def _lr_of_transformers(peak: float, warmup: int, total: int, step: int) -> float:
    """transformers' cosine-with-warmup learning rate of optimizer step `step` (from 0)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(step):
        opt.step()
        sched.step()
    return float(sched.get_last_lr()[0])


def test_epoch_steps_count_full_batches():
    assert epoch_steps(1.0, 100, 8) == 12 == steps_per_epoch(100, 8)  # the 4 left over are dropped
    assert epoch_steps(2.5, 100, 8) == 30
    assert epoch_steps(0.01, 100, 8) == 1  # at least one step


@pytest.mark.slow
def test_num_epochs_run_then_a_longer_resume_recomputes_the_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", TINY, f"train.output_dir={out}", *QUIET]
    assert cli.main([*argv, "train.num_epochs=0.01"]) == 0
    said = capsys.readouterr().out
    pairs = int(said.split("data: ")[1].split(" train pairs")[0])
    first = math.ceil(0.01 * (pairs // 8))
    assert f"train.num_epochs=0.01: {first} steps of 8 pairs" in said
    saved = load_config(out / "config.yaml")
    assert saved.train.max_steps == first and saved.train.num_epochs is None
    # the same command again: finished, no config difference (exit 0, nothing trained)
    assert cli.main([*argv, "train.num_epochs=0.01"]) == 0
    assert "already holds a finished run" in capsys.readouterr().out

    # half as long again: the cosine schedule now spans the longer run
    longer = math.ceil(0.015 * (pairs // 8))
    assert longer > first
    assert cli.main([*argv, "train.num_epochs=0.015"]) == 0
    said = capsys.readouterr().out
    peak, warmup = 1e-3, 2  # configs/tiny.yaml
    ran = _lr_of_transformers(peak, warmup, first, first - 1)
    now = _lr_of_transformers(peak, warmup, longer, first)
    assert f"train.max_steps {first} -> {longer}: the cosine learning-rate schedule is recomputed" in said
    assert f"step {first} ran at {ran:.3g}, step {first + 1} runs at {now:.3g}" in said, said
    assert f"the old schedule would give {_lr_of_transformers(peak, warmup, first, first):.3g}" in said
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}
    assert sorted(records) == list(range(1, longer + 1))
    assert records[first]["learning_rate"] == pytest.approx(ran, rel=1e-5)
    assert records[first + 1]["learning_rate"] == pytest.approx(now, rel=1e-5)
