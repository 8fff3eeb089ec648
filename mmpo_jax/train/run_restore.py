"""Reading a run directory for eval, export, generate and compare: the config saved in its
newest checkpoint, and a trainer holding that checkpoint's state.

The run may be live: its rotation (`train.keep_checkpoints`) deletes a step once a newer
one is saved, possibly while this reads it; the newest step is then chosen again.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import jax

from mmpo_jax import storage
from mmpo_jax.errors import UserError
from mmpo_jax.storage import Location
from mmpo_jax.train.checkpoint import (
    CHECKPOINTS_DIR,
    Checkpointer,
    StepVanished,
    check_checkpoints_dir,
    incomplete_reason,
    saved_config_text,
)

if TYPE_CHECKING:
    from mmpo_jax.config_schema import RunConfig
    from mmpo_jax.train.setup import Trainer

# How often eval, export and generate choose again when a live run deletes the step they
# read (its rotation): each try reads the newest step, which lives keep_checkpoints saves.
_READ_TRIES = 3


def saved_run_config(run_dir: Location, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, int]:
    """The config saved in a run's latest complete checkpoint (what trained those weights,
    even if a refused or failed start has since been given another one), with `overrides`
    applied, and that checkpoint's step; nothing is loaded. `config.yaml` beside it is for
    people to read."""
    run_dir = _run_location(run_dir)
    step, text = _saved_config(run_dir)
    return _run_config(run_dir, step, text, overrides), step


def _run_location(run_dir: Location) -> Location:
    storage.check_url(run_dir, "the run directory")
    return storage.absolute(run_dir) if storage.is_url(run_dir) else Path(run_dir)


def _saved_config(run_dir: Location) -> tuple[int, str]:
    """`(step, config text)` of the run's latest complete checkpoint, chosen again when a
    live run deletes it before its config is read."""
    from mmpo_jax.train.loop import latest_complete_step

    check_checkpoints_dir(run_dir)
    for attempt in itertools.count(1):
        step = latest_complete_step(run_dir)
        if step is None:
            if not storage.is_dir(storage.join(run_dir, CHECKPOINTS_DIR)):
                raise UserError(f"{run_dir} is not a run directory (no {CHECKPOINTS_DIR}/); "
                                "give the train.output_dir of a run")
            raise UserError(f"{run_dir} has no complete checkpoint yet (in {storage.join(run_dir, CHECKPOINTS_DIR)})")
        step_dir = storage.join(run_dir, CHECKPOINTS_DIR, str(step))
        try:
            return step, saved_config_text(step_dir)
        except UserError:
            if attempt == _READ_TRIES or incomplete_reason(step_dir) is None:
                raise
    raise AssertionError("unreachable")


def _run_config(run_dir: Location, step: int, text: str, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    from mmpo_jax.config import config_from_text

    return config_from_text(text, list(overrides) + [f"train.output_dir={run_dir}"],
                            where=f"the config saved in {storage.join(run_dir, CHECKPOINTS_DIR, str(step))}")


def restore_run(run_dir: Location, overrides: list[str] | tuple[str, ...] = (),
                say: Callable[[str], None] | None = None) -> tuple[Trainer, int]:
    """A finished or running run's trainer with the state of its newest intact checkpoint,
    built from the config saved in it (`saved_run_config`). A newer step that is corrupt or
    damaged is skipped, and `say` (stderr by default) hears which, why, and the step used; a
    step a live run deletes while it is read (its rotation) is chosen again, and said so."""
    from mmpo_jax.train.loop import abstract_state
    from mmpo_jax.train.setup import build_trainer

    say = say or _warn
    run_dir = _run_location(run_dir)
    step, text = _saved_config(run_dir)
    trainer: Trainer | None = None
    for attempt in itertools.count(1):
        if trainer is None:
            trainer = build_trainer(_run_config(run_dir, step, text, overrides))
        try:
            with Checkpointer(run_dir, keep=trainer.cfg.train.keep_checkpoints, read_only=True) as ckpt:
                restored = ckpt.restore_latest(abstract_state(trainer.state), say)
        except StepVanished as gone:
            if attempt == _READ_TRIES:
                raise UserError(f"{run_dir}: the run there deleted checkpoint step {gone.step} while it was read, "
                                f"{attempt} times in a row: read it when it saves less often (train.save_every) "
                                "or keeps more (train.keep_checkpoints), or once it stopped") from None
            say(f"checkpoint step {gone.step} of {run_dir} was deleted while it was read (the run there "
                "keeps only its newest train.keep_checkpoints); reading the newest one again")
            continue
        if restored is None:  # every step went between the listing and the read
            if attempt == _READ_TRIES:
                raise UserError(f"{run_dir}: its checkpoints were deleted while they were read; run this again")
            step, text = _saved_config(run_dir)
            continue
        if restored.config_yaml != text and attempt < _READ_TRIES:
            # a newer step, saved after a resume with --allow-config-change: its own config
            step, text, trainer = restored.step, restored.config_yaml, None
            continue
        trainer.state = restored.state
        return trainer, restored.step
    raise AssertionError("unreachable")


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        print(f"mmpo-jax: warning: {text}", file=sys.stderr, flush=True)
