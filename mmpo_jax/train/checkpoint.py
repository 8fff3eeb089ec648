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

Corruption. After a step is saved, process 0 writes `mmpo_checksums.json` into it:
each file's size and SHA-256 (in a bucket: the CRC32C that Cloud Storage computed when
the object was written, read from the listing, so nothing is downloaded). A run resuming from the latest step first checks its
files against it (a missing, truncated, zeroed or altered file), and a step that
fails is moved aside like an incomplete one, with the reason, and the one before it
tried; eval, export and generate (read-only) refuse a corrupt step naming the
file. A step saved before checksums existed has none and is taken as it is.

Restoring takes an abstract target (a pytree of `jax.ShapeDtypeStruct` with
`.sharding`, or of arrays) and puts every array on the target's sharding, so a
checkpoint written on one mesh (or number of processes) resumes on another.

`output_dir` may be a `gs://` URL: orbax writes the arrays there through tensorstore,
and this module reads and moves files through `mmpo_jax.storage` (a move on GCS is a
copy and a delete).

Only orbax APIs present in orbax-checkpoint 0.12.4 are used.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmpo_jax import storage
from mmpo_jax.errors import UserError
from mmpo_jax.storage import Location

if TYPE_CHECKING:
    from mmpo_jax.train.state import TrainState

STATE_ITEM = "state"
CONFIG_ITEM = "config"
CHECKPOINTS_DIR = "checkpoints"
INCOMPLETE_DIR = "checkpoints_incomplete"

# Orbax's marker of a finished step (both atomicity modes write it, 0.12.4 on).
_COMMIT_MARKER = "commit_success.txt"
# Files that must parse as JSON in a complete step: orbax's step metadata, the
# state item's tree metadata, the config item's JSON payload.
_JSON_FILES = ("_CHECKPOINT_METADATA", f"{STATE_ITEM}/_METADATA", f"{CONFIG_ITEM}/metadata")
_TMP_MARKER = ".orbax-checkpoint-tmp"
CHECKSUMS_FILE = "mmpo_checksums.json"
# At most this many leaf differences are listed in a mismatch error.
_MAX_LISTED = 8


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
        self.read_only = read_only
        self._async = async_save
        self._unsummed: list[int] = []  # saved steps whose checksums are not written yet
        self.moved_corrupt: list[Location] = []  # corrupt steps this Checkpointer moved aside
        skipped = _incomplete_entries(self.directory)
        # Read-only: orbax still lists the incomplete (non-tmp) step dirs; hide them.
        self._skipped_steps: set[int] = set()
        if read_only:
            for path, why in skipped:
                warnings.warn(f"skipping incomplete checkpoint '{path}': {why}", stacklevel=2)
                step = _step_of(storage.name(path))
                if _TMP_MARKER not in storage.name(path) and step is not None:
                    self._skipped_steps.add(step)
        else:
            # Called on every process even with nothing to move: it ends in a barrier.
            _move_aside(skipped, storage.join(self.output_dir, INCOMPLETE_DIR))
            # then the newest complete steps whose files changed since their save
            corrupt = _corrupt_latest(self.directory)
            self.moved_corrupt = [path for path, _ in corrupt]
            _move_aside(corrupt, storage.join(self.output_dir, INCOMPLETE_DIR), kind="corrupt")
        options = ocp.CheckpointManagerOptions(
            # read-only: orbax would reset these itself, logging a warning each.
            save_interval_steps=0 if read_only else 1,
            preservation_policy=None if read_only else ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
        )
        with _quiet_read_only_notice(read_only):
            self._manager = ocp.CheckpointManager(
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
        if self._unsummed:
            # orbax would wait for the previous async save here anyway; its checksums go first
            self.wait()
        if step in self._manager.all_steps():
            if wait:
                self.wait()
            return False
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                CONFIG_ITEM: ocp.args.JsonSave({"config_yaml": config_yaml}),
            }
        )
        # force: the loop decides when to save; orbax's own interval policy must not skip.
        saved = self._manager.save(step, args=args, force=True)
        if saved:
            self._unsummed.append(step)
        if wait or not self._async:
            self.wait()
        return bool(saved)

    def wait(self) -> None:
        """Blocks until any async save is complete on disk (then writes its checksums);
        raises its error if it failed."""
        self._manager.wait_until_finished()
        for step in self._unsummed:
            if jax.process_index() == 0 and storage.is_dir(self._step_dir(step)):
                write_checksums(self._step_dir(step))
        self._unsummed = []

    # -- restore -------------------------------------------------------------

    def restore(self, step: int | None, target: Any) -> tuple[Any, str]:
        """`(state, config_yaml)` of checkpoint `step` (None: the latest complete one).

        `target`: a pytree shaped like the saved state whose leaves are
        `jax.ShapeDtypeStruct`s with a `.sharding` (or arrays); each array is
        restored onto its leaf's sharding, whatever mesh it was saved from.
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
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(target),
                CONFIG_ITEM: ocp.args.JsonRestore(),
            }
        )
        restored = self._manager.restore(step, args=args)
        return restored[STATE_ITEM], _config_text(restored[CONFIG_ITEM], self._step_dir(step))

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
        wanted = _leaf_specs(target)
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
        """Waits for any async save, then releases orbax's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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


def _leaf_specs(target: Any) -> dict[str, Any]:
    """`{orbax leaf name: leaf}` of `target`, named as orbax names saved leaves."""
    names = ocp.tree.get_param_names(target, include_empty_nodes=False)
    return dict(zip(jax.tree.leaves(names), jax.tree.leaves(target)))


def _check_shardings(target: Any) -> None:
    """Every abstract leaf must say where it goes: orbax would otherwise guess from the saved mesh."""
    for name, leaf in _leaf_specs(target).items():
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            raise ValueError(
                f"restore target leaf '{name}' is a ShapeDtypeStruct without a sharding; "
                "give every leaf its target sharding (e.g. jax.ShapeDtypeStruct(s, d, sharding=...))"
            )


def _config_text(payload: Any, step_dir: Location) -> str:
    if not isinstance(payload, dict) or not isinstance(payload.get("config_yaml"), str):
        raise UserError(f"checkpoint '{step_dir}': its config item holds no `config_yaml` text")
    return payload["config_yaml"]


def _step_of(name: str) -> int | None:
    """The step of a step directory or orbax tmp directory name (None if neither)."""
    name = name.split(_TMP_MARKER)[0]
    return int(name) if name.isdigit() else None


def incomplete_reason(step_dir: Location) -> str | None:
    """Why `step_dir` is not a complete checkpoint, or None when it is."""
    if _TMP_MARKER in storage.name(step_dir):
        return "an orbax temporary directory (a save cut off before it finished)"
    if not storage.is_file(storage.join(step_dir, _COMMIT_MARKER)):
        return f"no '{_COMMIT_MARKER}' (the save never finished)"
    for rel in _JSON_FILES:
        try:
            json.loads(storage.read_text(storage.join(step_dir, *rel.split("/"))))
        except FileNotFoundError:
            return f"'{rel}' is missing"
        except (ValueError, UnicodeDecodeError):
            return f"'{rel}' is truncated or corrupt"
    return None


def write_checksums(step_dir: Location) -> None:
    """Writes `step_dir/mmpo_checksums.json`: every file's size and SHA-256 (in a bucket:
    the CRC32C GCS keeps for each object), by relative path."""
    stats = storage.file_stats(step_dir)
    files: dict[str, dict[str, Any]] = {}
    for rel, st in stats.items():
        if rel == CHECKSUMS_FILE:
            continue
        digest = {"crc32c": st.crc32c} if storage.is_url(step_dir) else \
            {"sha256": storage.sha256(storage.join(step_dir, *rel.split("/")))}
        files[rel] = {"bytes": st.size, **digest}
    storage.write_text(storage.join(step_dir, CHECKSUMS_FILE), json.dumps({"files": files}, indent=1) + "\n")


def corruption_reason(step_dir: Location) -> str | None:
    """How the files of a complete step differ from what its save wrote, or None when
    they match (or it has no checksums: saved before they existed). A verdict is kept
    while no file of the step changes its size or version (modification time, or GCS
    generation), so a run's start reads a checkpoint once."""
    stats = storage.file_stats(step_dir)
    if CHECKSUMS_FILE not in stats:
        return None
    return _corruption_reason(str(step_dir), tuple(sorted(stats.items())))


@functools.lru_cache(maxsize=64)
def _corruption_reason(step_dir: str, stamp: tuple[tuple[str, storage.FileStat], ...]) -> str | None:
    stats = dict(stamp)
    try:
        files = json.loads(storage.read_text(storage.join(step_dir, CHECKSUMS_FILE)))["files"]
        want = {rel: (int(f["bytes"]), f.get("sha256"), f.get("crc32c")) for rel, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"'{CHECKSUMS_FILE}' is truncated or corrupt"
    for rel, (size, sha, crc) in want.items():
        st = stats.get(rel)
        if st is None:
            return f"'{rel}' is missing (deleted after the save)"
        if st.size != size:
            return f"'{rel}' has {st.size} bytes, {size} when saved (truncated or overwritten)"
        if crc is not None and st.crc32c != crc:
            return f"'{rel}' differs from what the save wrote (its CRC32C does not match)"
        if sha is not None and storage.sha256(storage.join(step_dir, *rel.split("/"))) != sha:
            return f"'{rel}' differs from what the save wrote (its SHA-256 does not match)"
    return None


def step_dirs(directory: Location) -> list[int]:
    """The steps of the step directories of a checkpoints directory (not orbax's temporary
    ones), newest first."""
    return sorted((s for name, is_dir in storage.entries(directory) if is_dir and _TMP_MARKER not in name
                   and (s := _step_of(name)) is not None), reverse=True)


def _corrupt_latest(directory: Location) -> list[tuple[Location, str]]:
    """`(path, reason)` of the newest complete steps that fail `corruption_reason`, down to
    the first that passes (only the step a run resumes from is read in full)."""
    found = []
    for step in step_dirs(directory):
        reason = corruption_reason(storage.join(directory, str(step)))
        if reason is None:
            break
        found.append((storage.join(directory, str(step)), reason))
    return found


def _incomplete_entries(directory: Location) -> list[tuple[Location, str]]:
    """`(path, reason)` of each step-like entry of `directory` that is not complete, by step."""
    found = []
    for name, is_dir in storage.entries(directory):
        if not is_dir or _step_of(name) is None:
            continue  # not a step: orbax's root metadata files and the like
        reason = incomplete_reason(storage.join(directory, name))
        if reason is not None:
            found.append((storage.join(directory, name), reason))
    return sorted(found, key=lambda pr: (_step_of(storage.name(pr[0])), storage.name(pr[0])))


def _move_aside(entries: list[tuple[Location, str]], destination: Location, kind: str = "incomplete") -> None:
    """Moves incomplete step dirs out of orbax's sight (process 0), then syncs processes.

    Moved, not deleted: the step can then be saved again, does not count towards
    `keep`, and a wrong verdict costs disk space, never a checkpoint.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path, why in entries:
        moved = storage.join(destination, f"{storage.name(path)}.{stamp}")
        for n in itertools.count(1):  # the same step cut off twice within a second
            if not storage.exists(moved):
                break
            moved = storage.join(destination, f"{storage.name(path)}.{stamp}-{n}")
        warnings.warn(
            f"skipping {kind} checkpoint '{path}': {why}; moved it to '{moved}'", stacklevel=3
        )
        if jax.process_index() == 0:
            storage.move(path, moved)
    if jax.process_count() > 1:
        # Every process must see the moved directories before orbax lists the steps.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mmpo_jax_checkpoint_move_incomplete")


def saved_config_text(step_dir: Location) -> str:
    """The config YAML stored in a complete step directory, read from its file (no orbax
    manager, no state): what a run needs to know about its checkpoint before loading."""
    path = storage.join(step_dir, *_JSON_FILES[2].split("/"))
    try:
        payload = json.loads(storage.read_text(path))
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint '{step_dir}': cannot read its config ({path}: {err})") from None
    return _config_text(payload, step_dir)
