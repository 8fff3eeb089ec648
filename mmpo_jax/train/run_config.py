"""The resume policy: a run's config against the one its checkpoints were trained with,
and what a resolved run length means: the keys a resume may change, the check of the
others (also before a finished run is called finished), `train.num_epochs` as steps, and
the words for a learning-rate schedule that a new `train.max_steps` stretches."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from mmpo_jax import storage
from mmpo_jax.config import config_from_text, config_to_yaml
from mmpo_jax.config_schema import RunConfig
from mmpo_jax.data.batches import steps_per_epoch
from mmpo_jax.errors import UserError
from mmpo_jax.storage import Location
from mmpo_jax.train.checkpoint import CHECKPOINTS_DIR, saved_config_text
from mmpo_jax.train.optim import learning_rate_schedule

# Keys a resume may change without --allow-config-change: how long, how often and where
# the run logs, evaluates and saves, the mesh (a checkpoint resumes on any mesh) and how
# the same numbers are computed. Any other change alters the objective, the optimizer
# or the data of a run that is half done.
RESUME_SAFE_KEYS = frozenset({
    "train.max_steps", "train.num_epochs", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.save_every", "train.keep_checkpoints", "train.output_dir", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "model.remat", "model.attention", "model.logprob_chunk", "data.cache_dir", "data.max_invalid_fraction",
    "train.report_to", "train.run_name", "train.mlflow_tracking_uri", "train.storage_timeout_s",
})
CONFIG_CHANGES_FILE = "config_changes.jsonl"


def config_differences(saved_yaml: str, current_yaml: str, ignore: Collection[str] = ()) -> list[str]:
    """`key (old -> new)` for each config key (dotted) that differs, `ignore`d keys aside.

    A key the saved config does not have (it was written before the key existed) is no
    difference while the current value is the key's default: a new option's default
    keeps what the code did before it.
    """

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(yaml.safe_load(saved_yaml) or {}), flat(yaml.safe_load(current_yaml) or {})
    defaults = flat(yaml.safe_load(config_to_yaml(RunConfig())))
    a.update({k: defaults[k] for k in b if k not in a and k in defaults})
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys]


def check_resume_config(saved_yaml: str, current_yaml: str, allow: bool, finished: bool = False) -> None:
    """Refuses a resume that changes more than `RESUME_SAFE_KEYS` (unless `allow`); `finished`:
    the checkpoint is the run's last, which another config must not pass off as its own."""
    changed = config_differences(saved_yaml, current_yaml, ignore=RESUME_SAFE_KEYS)
    if not changed or allow:
        return
    if finished:
        raise UserError(
            "train.output_dir holds a finished run trained with another config: " + ", ".join(changed) + ". "
            "Its model is not this config's: choose another train.output_dir for this config (or pass "
            "--allow-config-change to accept that run as it is)"
        )
    raise UserError(
        "this run's checkpoint was trained with another config: " + ", ".join(changed) + ". "
        "Resuming would mix two objectives or data sets in one run: choose another train.output_dir, "
        "or pass --allow-config-change to resume with the change (it is recorded in the run directory)"
    )


def check_saved_config(output_dir: Location, step: int, current_yaml: str, allow: bool, finished: bool) -> None:
    """`check_resume_config` of the config saved in checkpoint `step` of `output_dir`
    (read from its files: no model is loaded for it)."""
    saved = saved_config_text(storage.join(output_dir, CHECKPOINTS_DIR, str(step)))
    check_resume_config(saved, current_yaml, allow, finished=finished)


def finished_line(output_dir: Location, step: int, max_steps: int) -> str:
    """What a start says of a run directory whose checkpoint `step` ends the run."""
    return (f"{output_dir} already holds a finished run ({step} of train.max_steps={max_steps} steps); "
            "raise train.max_steps to continue it, or choose another train.output_dir")


def record_config_change(out: Path, step: int, changes: list[str]) -> None:
    """Appends the resume's config changes to `<out>/config_changes.jsonl`."""
    line = json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes})
    with open(out / CONFIG_CHANGES_FILE, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def epoch_steps(num_epochs: float, train_pairs: int, batch_size: int) -> int:
    """Optimizer steps of `num_epochs` passes over `train_pairs` (TRL's
    ceil(num_train_epochs x steps per epoch)); an epoch is the full global batches it holds
    (`mmpo_jax.data.batches.steps_per_epoch`: the remainder is left out)."""
    return max(1, math.ceil(num_epochs * steps_per_epoch(train_pairs, batch_size)))


def with_run_length(cfg: RunConfig, train_pairs: int) -> tuple[RunConfig, str | None]:
    """`cfg` with `train.max_steps` resolved from `train.num_epochs` and the kept training
    pairs (unchanged when max_steps is given), and the line that says so (None when unchanged)."""
    tc = cfg.train
    if tc.num_epochs is None:
        return cfg, None
    steps = epoch_steps(tc.num_epochs, train_pairs, cfg.data.batch_size)
    per_epoch = steps / tc.num_epochs
    line = (f"train.num_epochs={tc.num_epochs:g}: {steps} steps of {cfg.data.batch_size} pairs "
            f"({per_epoch:.4g} per epoch over {train_pairs} train pairs)")
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, max_steps=steps, num_epochs=None)), line


def schedule_change_lines(saved_yaml: str, cfg: RunConfig, start: int) -> list[str]:
    """What a resume at `start` with another `train.max_steps` does to the learning rate: the
    schedule is a function of the run's length, so it is recomputed over the new one; the
    rate of step `start` as it was and of the next step as it now is."""
    saved = config_from_text(saved_yaml, where="the checkpoint's config")
    before, now = saved.train.max_steps, cfg.train.max_steps
    assert before is not None and now is not None, "a run's saved and current max_steps are resolved"
    if before == now or cfg.optim.schedule == "constant" and cfg.optim.warmup_steps < min(before, now):
        return []
    old_lr = learning_rate_schedule(saved.optim, before)
    new_lr = learning_rate_schedule(cfg.optim, now)
    # optimizer step k runs at lr(k): the step numbered `start` (1-based) used lr(start - 1)
    last, nxt = float(old_lr(start - 1)), float(new_lr(start))
    kept = float(old_lr(start))
    return [
        f"train.max_steps {before} -> {now}: the {cfg.optim.schedule} learning-rate schedule is recomputed over "
        f"{now} steps, so the rate jumps: step {start} ran at {last:.3g}, step {start + 1} runs at {nxt:.3g} "
        f"(the old schedule would give {kept:.3g}, its tail"
        + (", which is 0 past its end: more steps on it would not move the weights)" if kept == 0.0 else ")"),
    ]
