"""Reading a run directory: its newest complete step, the config saved in it, and its
state restored: for a resume (`resume_from`, the loop's), whole (`restore_run`: a
`Trainer` that could go on training) or for inference (`restore_inference`: the policy, and the reference where asked, never the
optimizer's moments), what eval, export, generate and compare read.

The run may be live: its rotation (`train.keep_checkpoints`) deletes a step once a newer
one is saved, possibly while this reads it; the newest step is then chosen again.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import jax

from mmpo_jax import storage
from mmpo_jax.config import config_from_text
from mmpo_jax.errors import UserError
from mmpo_jax.sharding import make_mesh
from mmpo_jax.storage import Location
from mmpo_jax.train.checkpoint import (
    CHECKPOINTS_DIR,
    INCOMPLETE_DIR,
    Checkpointer,
    Restored,
    StepVanished,
    check_checkpoints_dir,
    corruption_reason,
    incomplete_reason,
    saved_config_text,
    skipped,
    step_dirs,
)
from mmpo_jax.train.run_config import config_differences, schedule_change_lines
from mmpo_jax.train.setup import Evaluator, Trainer, abstract_run_state, build_evaluator, build_trainer

if TYPE_CHECKING:
    from mmpo_jax.config_schema import RunConfig
    from mmpo_jax.train.state import TrainState

# How often eval, export and generate choose again when a live run deletes the step they
# read (its rotation): each try reads the newest step, which lives keep_checkpoints saves.
_READ_TRIES = 3

Built = TypeVar("Built")


def latest_complete_step(output_dir: Location) -> int | None:
    """The newest complete, uncorrupted checkpoint step of a run directory, read from its files only."""
    root = storage.join(output_dir, CHECKPOINTS_DIR)
    for step in step_dirs(root):
        step_dir = storage.join(root, str(step))
        if incomplete_reason(step_dir) is None and corruption_reason(step_dir) is None:
            return step
    return None


def names_a_run(target: str) -> bool:
    """Whether a CONFIG|RUN_DIR argument names a run: a local directory, or a gs:// URL
    (a config is a local file)."""
    return storage.is_url(target) or Path(target).is_dir()


def abstract_state(state: Any) -> Any:
    """The state's shapes, dtypes and shardings: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


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
    return config_from_text(text, list(overrides) + [f"train.output_dir={run_dir}"],
                            where=f"the config saved in {storage.join(run_dir, CHECKPOINTS_DIR, str(step))}")


@dataclasses.dataclass(frozen=True)
class Resumed:
    """Where `train` starts: the state (restored, or the trainer's initial one), its step
    (0 for a new run) and the config keys that differ from the checkpoint's (`key (old -> new)`)."""

    state: TrainState
    start: int
    changes: list[str]


def resume_from(ckpt: Checkpointer, trainer: Trainer, config_yaml: str, say: Callable[[str], None]) -> Resumed:
    """The newest intact checkpoint of `ckpt` (a writer, which sets corrupt steps aside)
    onto `trainer`'s state, its config's differences from `config_yaml` said as warnings
    (with what a new length does to the schedule); the trainer's own state when there is
    none. A UserError when every checkpoint was corrupt: starting over is the user's call."""
    cfg, out = trainer.cfg, ckpt.output_dir
    restored = ckpt.restore_latest(abstract_state(trainer.state))
    if restored is None:
        if ckpt.moved_corrupt:
            raise UserError(
                f"every checkpoint of {out} was corrupt and is moved to {storage.join(out, INCOMPLETE_DIR)} "
                f"({', '.join(storage.name(p) for p in ckpt.moved_corrupt)}; the warnings above say which file): "
                "nothing is left to resume from. Run the same command again to start over from step 0."
            )
        return Resumed(trainer.state, 0, [])
    changes = config_differences(restored.config_yaml, config_yaml)
    if changes:
        say("warning: the config differs from the checkpoint's in " + ", ".join(changes))
        for line in schedule_change_lines(restored.config_yaml, cfg, restored.step):
            say("warning: " + line)
    say(f"resuming from {storage.join(out, CHECKPOINTS_DIR, str(restored.step))} "
        f"(step {restored.step} of {cfg.train.steps})")
    return Resumed(restored.state, restored.step, changes)


def restore_run(run_dir: Location, overrides: list[str] | tuple[str, ...] = (),
                say: Callable[[str], None] | None = None) -> tuple[Trainer, int]:
    """A finished or running run's trainer with the whole state of its newest intact
    checkpoint (optimizer state included: it could train on), built from the config saved
    in it (`saved_run_config`); see `_restore_newest` for the steps it skips."""
    trainer, restored = _restore_newest(run_dir, overrides, say, build_trainer,
                                        lambda trainer: abstract_state(trainer.state))
    trainer.state = restored.state
    return trainer, restored.step


@dataclasses.dataclass(frozen=True)
class _Target:
    """What an inference restore reads: the abstract state, with the leaves it leaves on disk `SKIP`."""

    cfg: RunConfig
    evaluator: Callable[[TrainState], Evaluator]
    state: TrainState


def restore_inference(run_dir: Location, overrides: list[str] | tuple[str, ...] = (),
                      say: Callable[[str], None] | None = None, *, reference: bool = False) -> tuple[Evaluator, int]:
    """`(evaluator, step)`: the policy of a run's newest intact checkpoint, restored alone
    (its trainable, frozen and non-parameter state: a LoRA run's base weights and adapters),
    onto the run's own mesh and shardings; what export, generate and compare read. No
    initial weights are loaded and no optimizer state is allocated (the evaluator's state
    holds `()` for it). `reference`: the reference weights the checkpoint holds
    (`model.reference=separate`) are restored too, which the eval step compares with;
    else the state holds None for them. Skipped steps as in `_restore_newest`."""

    def target(cfg: RunConfig) -> _Target:
        mesh = make_mesh(cfg.mesh)
        arch, options, sdef, state = abstract_run_state(cfg, mesh)
        state = dataclasses.replace(state, opt_state=skipped(state.opt_state),
                                    reference=state.reference if reference else skipped(state.reference))
        return _Target(cfg, lambda restored: build_evaluator(cfg, mesh, arch, options, sdef, restored), state)

    built, restored = _restore_newest(run_dir, overrides, say, target, lambda t: t.state)
    state = dataclasses.replace(restored.state, opt_state=(), reference=restored.state.reference if reference else None)
    return built.evaluator(state), restored.step


def _restore_newest(run_dir: Location, overrides: list[str] | tuple[str, ...], say: Callable[[str], None] | None,
                    build: Callable[[RunConfig], Built], target_of: Callable[[Built], Any]) -> tuple[Built, Restored]:
    """`(built, restored)`: `build(config)` of the config saved in the run's newest intact
    checkpoint, and that checkpoint restored onto `target_of(built)`. A newer step that is
    corrupt or damaged is skipped, and `say` (stderr by default) hears which, why, and the
    step used; a step a live run deletes while it is read (its rotation) is chosen again,
    and said so; a step saved with another config (a resume with --allow-config-change)
    is built again from its own."""
    say = say or _warn
    run_dir = _run_location(run_dir)
    step, text = _saved_config(run_dir)
    built: Built | None = None
    keep = 1
    for attempt in itertools.count(1):
        if built is None:
            cfg = _run_config(run_dir, step, text, overrides)
            built, keep = build(cfg), cfg.train.keep_checkpoints
        try:
            with Checkpointer(run_dir, keep=keep, read_only=True) as ckpt:
                restored = ckpt.restore_latest(target_of(built), say)
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
            step, text, built = restored.step, restored.config_yaml, None
            continue
        return built, restored
    raise AssertionError("unreachable")


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        print(f"mmpo-jax: warning: {text}", file=sys.stderr, flush=True)
