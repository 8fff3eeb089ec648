"""Train-state checkpoints: orbax steps under `<output_dir>/checkpoints/<step>/`.

Each step directory holds two orbax items:

- `state`: the train state pytree (params, optimizer state, step, RNG), saved
  sharded, each process writing its own shards (every process must call `save`);
- `config`: `{"config_yaml": <the resolved run config as YAML text>}`.

The data position is the step, so nothing else is needed to resume.

Completeness. Orbax writes a step into a temporary directory
(`<step>.orbax-checkpoint-tmp-<n>`) and renames it when every file is written
(or, on object stores, writes `commit_success.txt` last), so a crash mid-save
leaves the previous checkpoints untouched. A step directory counts as complete
when it has orbax's commit marker and its metadata files parse; anything else
(a temporary directory, a step cut off before its marker, truncated metadata)
is skipped with a warning, and when the Checkpointer may write, moved aside to
`<output_dir>/checkpoints_incomplete/` (not deleted: a false alarm must never
cost a checkpoint), so that the step can be saved again and does not count
towards `keep`.

Corruption. Process 0 writes `mmpo_checksums.json` into each step as part of its save:
each file's size and SHA-256 (in a bucket: the CRC32C that Cloud Storage computed when
the object was written, read from the listing, so nothing is downloaded). The array and
item files are summed on orbax's save thread once every process has written them and
before orbax commits the step (renames its temporary directory, or writes the commit
marker), so a complete step always has them and the loop does not wait for the hashing;
orbax's `_CHECKPOINT_METADATA` (stamped at the commit) and the commit marker are added at
the next save or `wait()` (a crash before that leaves them to the metadata checks above).
A run resuming checks the newest step's files against them (a missing, truncated, zeroed
or altered file), and a step that fails is moved aside like an incomplete one, with the
reason, and the one before it tried; eval, export and generate (read-only) use the newest
intact step and say which step they skipped and why. A step without checksums (saved by
a version before them) is unverified: it is restored, and taken only when every array in
it is finite; otherwise it is set aside the same way, named.

Restoring takes an abstract target (a pytree of `jax.ShapeDtypeStruct` with
`.sharding`, or of arrays) and puts every array on the target's sharding, so a
checkpoint written on one mesh (or number of processes) resumes on another. A target
leaf that is `SKIP` (`skipped(tree)`) is not read at all: it comes back as `SKIP`, so
eval, export and generate restore the policy without allocating the optimizer's moments
or the reference (`run_restore.restore_inference`).

`output_dir` may be a `gs://` URL: orbax writes the arrays there through tensorstore,
and this module reads and moves files through `mmpo_jax.storage` (a move on GCS is a
copy and a delete).

Only orbax APIs present in orbax-checkpoint 0.12.4 are used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmpo_jax import storage
from mmpo_jax.errors import UserError, first_line
from mmpo_jax.storage import Location
from mmpo_jax.train.checkpoint_bucket import (
    ASK_BUCKET_EVERY_S,
    BucketCheckpointManager,
    bound_tensorstore_retries,
    bucket_failure,
    skip_joining_at_exit,
)
from mmpo_jax.train.step_files import (  # noqa: F401  (names other modules read from here too)
    STATE_ITEM,
    CONFIG_ITEM,
    CHECKPOINTS_DIR,
    INCOMPLETE_DIR,
    _COMMIT_MARKER,
    _JSON_FILES,
    _TMP_MARKER,
    CHECKSUMS_FILE,
    _COMMITTED_LATER,
    _MAX_LISTED,
    _leaf_specs,
    _config_text,
    _step_of,
    incomplete_reason,
    write_checksums,
    add_checksums,
    _file_sum,
    corruption_reason,
    _corruption_reason,
    has_checksums,
    _unverified_reason,
    nonfinite_leaves,
    check_checkpoints_dir,
    step_dirs,
    _corrupt_latest,
    _incomplete_entries,
    _move_aside,
    saved_config_text,
)

if TYPE_CHECKING:
    from mmpo_jax.train.state import TrainState

# A restore target's leaf left on disk (orbax's placeholder: never read, no memory).
SKIP: Any = ocp.PLACEHOLDER


def skipped(tree: Any) -> Any:
    """`tree` (a restore target's subtree) with every leaf `SKIP`."""
    return jax.tree.map(lambda _: SKIP, tree)

# Orbax's CheckpointManager logs this (absl, WARNING) whenever it is built with
# read_only=True, whatever the directory's permissions: it describes the mode eval,
# export and generate ask for, not a problem, so those commands must not print it.
_READ_ONLY_NOTICE = "Given directory is read only=%s"


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _READ_ONLY_NOTICE


@contextlib.contextmanager
def _quiet_read_only_notice(active: bool = True) -> Iterator[None]:
    """Drops orbax's read-only notice on the `absl` logger for the duration (only that
    message: every other record passes)."""
    if not active:
        yield
        return
    logger = logging.getLogger("absl")
    quiet = _DropReadOnlyNotice()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class Checkpointer:
    """Saves and restores the train state of one run directory.

    Every process of a multi-process run must construct it and call `save` for
    each step (orbax coordinates the processes). Use as a context manager, or
    call `close()`, so that an async save finishes before exit.

    Args:
      output_dir: the run's output directory; checkpoints go under
        `<output_dir>/checkpoints/<step>/`.
      keep: how many of the latest checkpoints to keep (>= 1; older ones are
        deleted after a newer one is complete).
      async_save: save in a background thread after copying the arrays to host
        memory (`save` returns early; `wait()` blocks until written).
      read_only: never write: incomplete steps are skipped but not moved, and
        `save` raises.
    """

    def __init__(
        self,
        output_dir: Location,
        keep: int,
        *,
        async_save: bool = False,
        read_only: bool = False,
    ) -> None:
        if keep < 1:
            raise UserError(f"train.keep_checkpoints={keep}: must be >= 1 (the checkpoints to keep)")
        storage.check_url(output_dir, "train.output_dir")
        self.output_dir = storage.absolute(output_dir)
        self.directory = storage.join(self.output_dir, CHECKPOINTS_DIR)
        check_checkpoints_dir(self.output_dir)
        self.read_only = read_only
        self._async = async_save
        self._saving: int | None = None  # the step whose save is in flight (its callback sums it)
        self._topping_up: list[int] = []  # committed steps whose manifest lacks _COMMITTED_LATER
        self.moved_corrupt: list[Location] = []  # corrupt steps this Checkpointer moved aside
        skipped = _incomplete_entries(self.directory)
        # Read-only: orbax still lists the incomplete (non-tmp) step dirs; hide them.
        self._skipped_steps: set[int] = set()
        if read_only:
            for path, why in skipped:
                if _TMP_MARKER in storage.name(path):
                    continue  # orbax lists none; and to a reader it may be a live run's save under way
                warnings.warn(f"skipping incomplete checkpoint '{path}': {why}", stacklevel=2)
                step = _step_of(storage.name(path))
                if step is not None:
                    self._skipped_steps.add(step)
        else:
            # Called on every process even with nothing to move: it ends in a barrier.
            _move_aside(skipped, storage.join(self.output_dir, INCOMPLETE_DIR))
            # then the newest complete steps whose files changed since their save
            corrupt = _corrupt_latest(self.directory)
            self.moved_corrupt = [path for path, _ in corrupt]
            _move_aside(corrupt, storage.join(self.output_dir, INCOMPLETE_DIR), kind="corrupt")
        # a save that failed on, or outlived, a bucket that stopped answering: raised again by
        # every later wait, which never waits for it again
        self._gave_up: UserError | None = None
        manager: Any = ocp.CheckpointManager
        if storage.is_url(self.directory):
            storage.bound_fsspec_gcs()
            bound_tensorstore_retries(storage.timeout_s())
            manager = functools.partial(BucketCheckpointManager, give_up=self._give_up)
        options = ocp.CheckpointManagerOptions(
            # read-only: orbax would reset these itself, logging a warning each.
            save_interval_steps=0 if read_only else 1,
            preservation_policy=None if read_only else ocp.checkpoint_managers.LatestN(n=keep),
            # A writer always saves through orbax's async path (a blocking save then waits):
            # only it runs a callback between the last file written and the commit.
            enable_async_checkpointing=not read_only,
            async_options=None if read_only else ocp.AsyncOptions(post_finalization_callback=self._sum_uncommitted),
            read_only=read_only,
            create=not read_only,
        )
        with _quiet_read_only_notice(read_only):
            self._manager = manager(
                epath.Path(self.directory),
                item_names=(STATE_ITEM, CONFIG_ITEM),
                # Registered up front so that metadata can be read before any
                # save or restore of this manager.
                item_handlers={
                    STATE_ITEM: ocp.StandardCheckpointHandler(),
                    CONFIG_ITEM: ocp.JsonCheckpointHandler(),
                },
                options=options,
            )

    # -- queries -------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints, ascending.

        With `async_save`, includes a step this Checkpointer is still writing
        (call `wait()` first for only what is on disk).
        """
        return sorted(s for s in self._manager.all_steps() if s not in self._skipped_steps)

    def latest_step(self) -> int | None:
        """The latest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save ----------------------------------------------------------------

    def save(self, step: int, state: TrainState, config_yaml: str, *, wait: bool = False) -> bool:
        """Saves `state` (a pytree of arrays) and the resolved config at `step`.

        Every process must call it with its shards of the same state. Returns
        False, saving nothing, when `step` is already saved (e.g. a final or
        SIGINT save right after a periodic one). With `async_save` it returns
        once the arrays are copied to host memory; `wait=True` blocks until the
        checkpoint is complete on disk (use it before exiting).
        """
        if self.read_only:
            raise ValueError(f"Checkpointer on '{self.directory}' is read-only: cannot save step {step}")
        # orbax waits for the previous save here anyway; `_saving` must not change under its callback
        self.wait()
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                CONFIG_ITEM: ocp.args.JsonSave({"config_yaml": config_yaml}),
            }
        )
        self._saving = step
        # force: the loop decides when to save; orbax's own interval policy must not skip.
        saved = self._manager.save(step, args=args, force=True)
        if saved:
            self._topping_up.append(step)
        if wait or not self._async:
            self.wait()
        return bool(saved)

    def wait(self) -> None:
        """Blocks until any async save is complete on disk (then adds orbax's commit files to
        its checksums); raises its error if it failed."""
        self._wait_for_orbax()
        for step in self._topping_up:
            if jax.process_index() == 0 and storage.is_dir(self._step_dir(step)):
                add_checksums(self._step_dir(step), _COMMITTED_LATER)
        self._topping_up = []

    def _sum_uncommitted(self) -> None:
        """orbax's post-finalization callback: on process 0's save thread, once every process
        has written its files of the step and before orbax commits it."""
        assert self._saving is not None, "a save callback with no save in flight"
        write_checksums(self._uncommitted_dir(self._saving), skip=_COMMITTED_LATER)

    def _uncommitted_dir(self, step: int) -> Location:
        """Where orbax is writing `step`: its temporary directory, or (object stores, where
        orbax commits with a marker instead of a rename) the step directory itself."""
        tmp = sorted(name for name, is_dir in storage.entries(self.directory)
                     if is_dir and name.startswith(f"{step}{_TMP_MARKER}"))
        return storage.join(self.directory, tmp[-1]) if tmp else self._step_dir(step)

    # -- restore -------------------------------------------------------------

    def restore(self, step: int | None, target: Any) -> tuple[Any, str]:
        """`(state, config_yaml)` of checkpoint `step` (None: the latest complete one).

        `target`: a pytree shaped like the saved state whose leaves are
        `jax.ShapeDtypeStruct`s with a `.sharding` (or arrays); each array is
        restored onto its leaf's sharding, whatever mesh it was saved from; a
        `SKIP` leaf is not read and comes back `SKIP`.
        Raises UserError when there is no such checkpoint, or when its leaves
        (names, shapes, dtypes) differ from the target's, naming them.
        """
        step = self._existing_step(step)
        corrupt = corruption_reason(self._step_dir(step))
        if corrupt is not None:
            older = [s for s in self.all_steps() if s < step]
            raise UserError(
                f"checkpoint '{self._step_dir(step)}' is corrupt: {corrupt}. "
                + (f"Older complete checkpoints: steps {older} (a resumed train run moves this one "
                   "aside and continues from the newest of them)" if older else "No older checkpoint is left")
            )
        self._check_matches(step, target)
        _check_shardings(target)
        if any(leaf is SKIP for leaf in jax.tree.leaves(target)):
            # StandardRestore refuses placeholders: the state item is orbax's PyTree format
            # (what StandardSave writes), read with the handler that skips them
            where = epath.Path(storage.join(self._step_dir(step), STATE_ITEM))
            partial = ocp.args.PyTreeRestore(item=target,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(target))
            return ocp.PyTreeCheckpointHandler().restore(where, args=partial), self.read_config(step)
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(target),
                CONFIG_ITEM: ocp.args.JsonRestore(),
            }
        )
        restored = self._manager.restore(step, args=args)
        return restored[STATE_ITEM], _config_text(restored[CONFIG_ITEM], self._step_dir(step))

    def restore_latest(self, target: Any, say: Callable[[str], None] | None = None) -> Restored | None:
        """The newest complete step that is intact, restored onto `target` (as `restore`
        does); None when there is no complete step.

        Intact: its files match its checksums, or it has none (saved before they existed:
        unverified) and every array restored from it is finite. A writable Checkpointer
        moves a step that is not to `checkpoints_incomplete/`, warning why, and tries the
        one before; a read-only one skips it, `say` hearing which step it skipped, why, and
        which it used, and raises UserError when none is left. Read-only, a step that
        vanishes while it is read (a live run's rotation, which deletes a step only once it
        has saved a newer one) raises `StepVanished`: open a new Checkpointer and choose again.
        """
        say = say or (lambda text: warnings.warn(text, stacklevel=3))
        _check_shardings(target)  # a caller's mistake, before any step could be blamed for it
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                reason = corruption_reason(self._step_dir(step))
                if reason is None:
                    state, config_yaml = self.restore(step, target)
                    reason = _unverified_reason(self._step_dir(step), state)
            except Exception as err:
                if self.read_only and self._vanished(step):
                    raise StepVanished(step) from err
                # orbax's and tensorstore's errors for bytes they cannot parse (not I/O errors,
                # which a retry may cure); with checksums, such a step fails them first
                if not isinstance(err, ValueError) or self.is_verified(step):
                    raise
                reason = (f"it has no '{CHECKSUMS_FILE}' to verify it by (saved before checksums existed), "
                          f"and reading it failed: {first_line(err)}")
            if reason is not None and self.read_only and self._vanished(step):
                raise StepVanished(step)  # its files went missing under the checksums
            if reason is None:
                for old, why in skipped if self.read_only else ():  # (a writer warned as it moved them)
                    say(f"skipping checkpoint '{self._step_dir(old)}': {why}; using step {step}, the newest "
                        "intact one (a train run of this directory moves the other aside)")
                return Restored(state, config_yaml, step)
            skipped.append((step, reason))
            if not self.read_only:
                self._set_aside(step, reason)
        if skipped and self.read_only:
            raise UserError(f"no intact checkpoint in '{self.directory}': "
                            + "; ".join(f"step {s}: {why}" for s, why in skipped))
        return None

    def _vanished(self, step: int) -> bool:
        """Whether `step` is gone or going: no longer complete on disk, or newer than this
        Checkpointer's listing is a step completed since (a live run's rotation is under way)."""
        if incomplete_reason(self._step_dir(step)) is not None:
            return True
        listed = max(self._manager.all_steps(), default=-1)
        return any(s > listed and incomplete_reason(self._step_dir(s)) is None for s in step_dirs(self.directory))

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves an unverified step that failed its check out of orbax's sight, which is told."""
        _move_aside([(self._step_dir(step), reason)], storage.join(self.output_dir, INCOMPLETE_DIR),
                    kind="unverified")
        self.moved_corrupt.append(self._step_dir(step))
        self._manager.reload()  # else it would count the step as saved, and skip saving it again

    def is_verified(self, step: int) -> bool:
        """Whether `step` holds checksums (every step this version saves does)."""
        return has_checksums(self._step_dir(step))

    def read_config(self, step: int | None = None) -> str:
        """The resolved config YAML saved with checkpoint `step` (None: the latest)."""
        step = self._existing_step(step)
        args = ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        return _config_text(restored[CONFIG_ITEM], self._step_dir(step))

    def _existing_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise UserError(f"no complete checkpoint in '{self.directory}' to restore from")
            return steps[-1]
        if step not in steps:
            raise UserError(
                f"no complete checkpoint for step {step} in '{self.directory}'; "
                f"the complete ones are at steps {steps or 'none'}"
            )
        return step

    def _step_dir(self, step: int) -> Location:
        return storage.join(self.directory, str(step))

    def _check_matches(self, step: int, target: Any) -> None:
        metadata = self._manager.metadata(step).item_metadata[STATE_ITEM]
        tree = getattr(metadata, "tree", metadata)  # TreeMetadata, or a bare tree
        saved = {m.name: m for m in jax.tree.leaves(tree)}
        # a skipped leaf must exist (orbax matches the whole tree) but is not read: any shape will do
        wanted = {name: saved.get(name, leaf) if leaf is SKIP else leaf for name, leaf in _leaf_specs(target).items()}
        problems = tree_mismatches(saved, wanted)
        if problems:
            listed = "\n  ".join(problems[:_MAX_LISTED])
            more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise UserError(
                f"checkpoint '{self._step_dir(step)}' does not match the state this config builds "
                f"({len(problems)} difference(s), checkpoint vs this run):\n  {listed}{more}\n"
                "The model, LoRA, reference or optimizer settings changed since it was saved: "
                f"resume with the config it was saved with (its text is in "
                f"'{storage.join(self._step_dir(step), CONFIG_ITEM, 'metadata')}'), or start this config "
                "in a new train.output_dir."
            )

    # -- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Waits for any async save, then releases orbax's resources (neither after a save
        that did not finish: its error is raised already, and its threads wait on a bucket
        that does not answer)."""
        if self._gave_up is not None:
            return
        self.wait()
        self._manager.close()

    def _wait_for_orbax(self) -> None:
        """orbax's wait for its save threads. For a bucket, while the save runs the bucket is
        asked every few seconds whether it answers (a large save may take any time), and
        the wait is given up (`_give_up`) when it has not for `storage.timeout_s()` seconds,
        or when the save failed on the bucket."""
        if self._gave_up is not None:
            raise self._gave_up
        if not storage.is_url(self.directory):
            self._manager.wait_until_finished()
            return
        steps = self._manager.all_steps()  # before the wait: a failed save leaves orbax's list
        failed: list[BaseException] = []

        def wait() -> None:
            try:
                self._manager.wait_until_finished()
            except BaseException as err:  # handed to the caller's thread
                failed.append(err)

        waiter = threading.Thread(target=wait, name="mmpo_checkpoint_wait", daemon=True)
        waiter.start()
        while True:
            # a bucket already found gone is asked at once (one try: `storage.outage`)
            waiter.join(0 if storage.outage() else min(storage.timeout_s() / 2, ASK_BUCKET_EVERY_S))
            if not waiter.is_alive():
                break
            try:
                storage.entries(self.directory)
            except storage.StorageUnreachable as err:
                self._give_up(max(steps, default=None), err.why, steps)
            except Exception:  # an answer all the same (a refusal, a listing error): the bucket is there
                pass
        if failed:
            why = bucket_failure(failed[0], self.directory)
            if why is None:
                raise failed[0]
            self._give_up(max(steps, default=None), why, steps)

    def _give_up(self, step: int | None, why: str, steps: list[int]) -> NoReturn:
        """Raises (now and at every later wait) the UserError of a save to a bucket that was
        cut off: the bucket, the step not saved, the newest intact one."""
        older = [s for s in steps if step is None or s < step]
        intact = (f"the checkpoint of step {max(older)} is intact: run the same command again once the bucket "
                  "answers, to resume from it") if older else \
            "no earlier checkpoint was saved: run the same command again once the bucket answers"
        storage.mark_outage(why)
        skip_joining_at_exit()
        self._gave_up = UserError(f"the checkpoint of step {step} was not saved to {self.directory}: {why}; {intact}")
        raise self._gave_up

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class Restored:
    """What `Checkpointer.restore_latest` restored: the state, its config text and its step."""

    state: Any
    config_yaml: str
    step: int


class StepVanished(Exception):
    """A read-only restore's step was deleted while it was read (a live run's rotation)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"checkpoint step {step} was deleted while it was read")
        self.step = step


# -- pure helpers -------------------------------------------------------------


def tree_mismatches(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between two `{leaf name: spec}` maps.

    A spec is anything with `.shape` and `.dtype` (orbax ArrayMetadata,
    jax.ShapeDtypeStruct, arrays). Names are orbax's dotted leaf names
    (`trainable.layers.attn.q.kernel.value`, `opt_state.0.mu...`).
    """
    problems = []
    for name in sorted(saved.keys() - wanted.keys()):
        problems.append(f"{name}: in the checkpoint, not in this run's state")
    for name in sorted(wanted.keys() - saved.keys()):
        problems.append(f"{name}: in this run's state, not in the checkpoint")
    for name in sorted(saved.keys() & wanted.keys()):
        a, b = saved[name], wanted[name]
        a_shape, b_shape = tuple(getattr(a, "shape", ())), tuple(getattr(b, "shape", ()))
        if a_shape != b_shape:
            problems.append(f"{name}: shape {a_shape} in the checkpoint, {b_shape} in this run")
        a_dtype, b_dtype = getattr(a, "dtype", None), getattr(b, "dtype", None)
        # A dtype change (e.g. model.param_dtype) would be cast silently: refuse it.
        if a_dtype is not None and b_dtype is not None and np.dtype(a_dtype) != np.dtype(b_dtype):
            problems.append(f"{name}: dtype {a_dtype} in the checkpoint, {b_dtype} in this run")
    return problems


def _check_shardings(target: Any) -> None:
    """Every abstract leaf must say where it goes: orbax would otherwise guess from the saved mesh."""
    for name, leaf in _leaf_specs(target).items():
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            raise ValueError(
                f"restore target leaf '{name}' is a ShapeDtypeStruct without a sharding; "
                "give every leaf its target sharding (e.g. jax.ShapeDtypeStruct(s, d, sharding=...))"
            )


