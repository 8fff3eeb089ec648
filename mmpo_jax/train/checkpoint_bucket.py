"""The bucket side of `Checkpointer`'s saves (`output_dir` a `gs://` URL): orbax's manager
whose `save` gives up naming the step when the bucket cuts it off, what a save's error
says of the bucket, orbax's tensorstore retries bounded to `train.storage_timeout_s`,
and a process that gave up exiting without joining orbax's save threads."""

from __future__ import annotations

import functools
import os
import sys
import threading
from types import ModuleType
from typing import Any, Callable, NoReturn

import orbax.checkpoint as ocp

from mmpo_jax import storage
from mmpo_jax.errors import first_line
from mmpo_jax.storage import Location

_TENSORSTORE_UTILS: ModuleType | None
try:  # orbax 0.12's layout, whose tensorstore contexts `bound_tensorstore_retries` edits
    from orbax.checkpoint._src.serialization import tensorstore_utils

    _TENSORSTORE_UTILS = tensorstore_utils
except ImportError:  # pragma: no cover - another orbax layout
    _TENSORSTORE_UTILS = None


class BucketCheckpointManager(ocp.CheckpointManager):
    """orbax's manager of a bucket's checkpoints, whose `save` writes a step's first files
    before it returns: one that the bucket cuts off raises `give_up`'s UserError, naming
    the step (the one in flight is the newest: orbax saves one step at a time)."""

    def __init__(self, *args: Any, give_up: Callable[[int | None, str, list[int]], NoReturn],
                 **kwargs: Any) -> None:
        self._mmpo_give_up = give_up
        super().__init__(*args, **kwargs)

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        steps = self.all_steps()
        try:
            return bool(super().save(step, *args, **kwargs))
        except Exception as err:
            why = bucket_failure(err, str(self.directory))
            if why is None:
                raise
            self._mmpo_give_up(step, why, steps)


def bucket_failure(err: BaseException, directory: Location) -> str | None:
    """What a save's error says of the bucket that cut it off (None: not the bucket's doing,
    e.g. a bug, raised as it is)."""
    if isinstance(err, storage.StorageUnreachable):
        return err.why
    bucket = storage.bucket_of(directory)
    if storage.is_unreachable_error(err):
        return f"cannot reach the bucket '{bucket}' ({type(err).__name__}: {first_line(err)})"
    if isinstance(err, OSError):  # gcsfs's refusals (403, an upload session the bucket lost, ...)
        return f"the bucket '{bucket}' refused a write ({type(err).__name__}: {first_line(err)})"
    return None


# While a save to a bucket runs, the bucket is asked this often whether it still answers
# (one listing of the checkpoints directory).
ASK_BUCKET_EVERY_S = 2.0


def bound_tensorstore_retries(seconds: float) -> None:
    """Makes orbax's tensorstore contexts retry a GCS request for about `seconds`
    (`storage.tensorstore_retries`), not tensorstore's quarter of an hour, so that the save
    threads of a bucket that went away end with an error rather than outlive the run. orbax
    0.12 builds each context from these two dicts; should they go, the wait still gives up
    on a bucket that does not answer (`Checkpointer._wait_for_orbax`)."""
    if _TENSORSTORE_UTILS is None:  # pragma: no cover - another orbax layout
        return
    for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
        spec = getattr(_TENSORSTORE_UTILS, name, None)
        if isinstance(spec, dict):
            spec["gcs_request_retries"] = storage.tensorstore_retries(seconds)


@functools.lru_cache(maxsize=1)
def skip_joining_at_exit() -> None:
    """Makes a process whose save to a bucket was given up exit without joining orbax's
    save threads: Python joins every non-daemon thread and concurrent.futures worker before
    it exits, and those may still be retrying the bucket (tensorstore's requests, up to the
    timeout each), logging as they fail. `threading._register_atexit` hooks run before those
    joins: this one ends the process there, with the CLI's status for the UserError raised."""
    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(leave)
