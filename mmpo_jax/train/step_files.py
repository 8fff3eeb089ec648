"""The files of a saved step, read without orbax's manager: whether a step directory is
complete, its checksums (`mmpo_checksums.json`: written, extended, verified), whether a
restored state is finite, and moving a bad step aside. `Checkpointer`
(`mmpo_jax.train.checkpoint`) saves and restores through orbax and uses these; `train`,
eval and the sweep read run directories with them."""

from __future__ import annotations

import functools
import itertools
import json
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmpo_jax import storage
from mmpo_jax.errors import UserError
from mmpo_jax.storage import Location

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
# Written (or rewritten) by orbax's commit, after the checksums: summed at the next `wait()`.
_COMMITTED_LATER = (_JSON_FILES[0], _COMMIT_MARKER)
# At most this many leaf differences are listed in a mismatch error.
_MAX_LISTED = 8


def _leaf_specs(target: Any) -> dict[str, Any]:
    """`{orbax leaf name: leaf}` of `target`, named as orbax names saved leaves."""
    names = ocp.tree.get_param_names(target, include_empty_nodes=False)
    return dict(zip(jax.tree.leaves(names), jax.tree.leaves(target)))


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


def write_checksums(step_dir: Location, skip: tuple[str, ...] = ()) -> None:
    """Writes `step_dir/mmpo_checksums.json`: every file's size and SHA-256 (in a bucket:
    the CRC32C GCS keeps for each object), by relative path, but those in `skip`."""
    stats = storage.file_stats(step_dir)
    files = {rel: _file_sum(step_dir, rel, st) for rel, st in stats.items() if rel not in (CHECKSUMS_FILE, *skip)}
    storage.write_text(storage.join(step_dir, CHECKSUMS_FILE), json.dumps({"files": files}, indent=1) + "\n")


def add_checksums(step_dir: Location, names: tuple[str, ...]) -> None:
    """Adds the files `names` (those present and not listed yet) to the checksums of
    `step_dir`, which is rewritten whole (a step without checksums is left so)."""
    path = storage.join(step_dir, CHECKSUMS_FILE)
    try:
        files = json.loads(storage.read_text(path))["files"]
    except (FileNotFoundError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return  # none, or damaged: `corruption_reason` says so, a rewrite would hide it
    stats = storage.file_stats(step_dir)
    added = {rel: _file_sum(step_dir, rel, stats[rel]) for rel in names if rel in stats and rel not in files}
    if added:
        storage.write_text(path, json.dumps({"files": {**files, **added}}, indent=1) + "\n")


def _file_sum(step_dir: Location, rel: str, st: storage.FileStat) -> dict[str, Any]:
    digest = {"crc32c": st.crc32c} if storage.is_url(step_dir) else \
        {"sha256": storage.sha256(storage.join(step_dir, *rel.split("/")))}
    return {"bytes": st.size, **digest}


def corruption_reason(step_dir: Location) -> str | None:
    """How the files of a complete step differ from what its save wrote, or None when
    they match (or it has no checksums: saved before they existed, see
    `Checkpointer.restore_latest` for how such a step is checked). A verdict is kept
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


def has_checksums(step_dir: Location) -> bool:
    """Whether a step directory holds `mmpo_checksums.json` (else it is unverified)."""
    return storage.is_file(storage.join(step_dir, CHECKSUMS_FILE))


def _unverified_reason(step_dir: Location, state: Any) -> str | None:
    """Why a step restored as `state` cannot be taken although its files passed
    `corruption_reason`: it has no checksums and arrays that are not finite (None otherwise)."""
    if has_checksums(step_dir):
        return None
    bad = nonfinite_leaves(state)
    if not bad:
        return None
    listed = ", ".join(bad[:_MAX_LISTED]) + (f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else "")
    return (f"it has no '{CHECKSUMS_FILE}' to verify it by (saved before checksums existed), and {len(bad)} "
            f"of its arrays are not finite ({listed}), so its files are damaged")


def nonfinite_leaves(state: Any) -> list[str]:
    """The orbax names of the floating-point arrays of `state` holding a NaN or an inf, sorted
    (one jitted reduction; every process of a multi-process run must call it)."""
    floats = {name: x for name, x in _leaf_specs(state).items()
              if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)}
    if not floats:
        return []
    flags = jax.jit(lambda xs: {n: ~jnp.all(jnp.isfinite(x)) for n, x in xs.items()})(floats)
    # a scalar's local copy: the result is replicated, and not every process can address all of it
    return sorted(n for n, f in flags.items() if bool(np.asarray(f.addressable_data(0))))


def check_checkpoints_dir(output_dir: Location) -> None:
    """A UserError when `<output_dir>/checkpoints` exists and is not a directory: orbax would
    see a run without checkpoints, which starts over at step 0 and truncates `metrics.jsonl`."""
    path = storage.join(output_dir, CHECKPOINTS_DIR)
    if storage.exists(path) and not storage.is_dir(path):
        raise UserError(f"'{path}' is a file, not the run's directory of checkpoints: move it out of the way, "
                        "or choose another train.output_dir")


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
