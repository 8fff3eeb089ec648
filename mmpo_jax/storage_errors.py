"""File-system errors a user fixes (disk full, `ulimit -f`, permissions), however they
surface, as one line that says what to do.

Python's own writes raise `OSError` with an errno. orbax's do not: tensorstore's
status comes back as a `ValueError` whose text carries the errno, e.g.
`OUT_OF_RANGE: Error writing ... File too large [os_error_code='27']` (`ulimit -f`)
or `RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']`; safetensors
(Rust) writes `Os { code: 28, kind: StorageFull, .. }` and arrow `[errno 28]`.
`as_oserror` reads any of them back into an `OSError`, so the CLI reports them all
alike, and `quiet_failed_writes` keeps orbax's background threads from printing a
traceback for each write it abandons meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from mmpo_jax.errors import first_line

# errno -> what to do, for the errors a user can fix (`describe`).
USER_FIXABLE_ERRNOS = {
    errno.ENOSPC: "Free space on that disk (the checkpoints already saved are complete), then run the same command again.",
    errno.EDQUOT: "Free space under your disk quota, then run the same command again.",
    errno.EFBIG: "The file outgrew a size limit (ulimit -f): raise it, then run the same command again.",
    errno.EROFS: "That file system is read-only: choose a writable train.output_dir (or destination).",
    errno.EACCES: "Permission denied: choose a directory you can write, or fix its permissions.",
    errno.EPERM: "Operation not permitted: choose a directory you can write, or fix its permissions.",
    errno.ENOTDIR: "A path component is a file, not a directory: choose another path.",
    errno.EISDIR: "That path is a directory where a file was expected: choose another path.",
}

# Where a library's message carries the errno of a failed write. Only with the errno:
# XLA says RESOURCE_EXHAUSTED for device memory too, which is no disk's fault.
_ERRNO_IN_TEXT = re.compile(r"\[os_error_code='?(\d+)'?\]|\bOs \{ code: (\d+)|\[errno (\d+)\]", re.IGNORECASE)
# the file a tensorstore write names (`Failed writing: "/path"`), else the first absolute path
_FILE_IN_TEXT = (re.compile(r'Failed writing: "([^"]+)"'), re.compile(r'"(/[^"]+)"'), re.compile(r"'(/[^']+)'"))
# orbax writes a step to `<step>.orbax-checkpoint-tmp/...` and renames it when complete:
# the step's directory is the name a user knows
_ORBAX_TMP = ".orbax-checkpoint-tmp"


def as_oserror(err: BaseException) -> OSError | None:
    """`err`, or the first error in its chain of causes (`raise ... from`), as an `OSError`
    with an errno in `USER_FIXABLE_ERRNOS` (read from its text when it is a library's
    status); None when there is none. Not the implicit context: an error raised while
    another was handled is not that error's fault."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in USER_FIXABLE_ERRNOS:
            return current
        found = _from_text(str(current))
        if found is not None:
            return found
        current = current.__cause__
    return None


def _from_text(text: str) -> OSError | None:
    m = _ERRNO_IN_TEXT.search(text)
    if m is None:
        return None
    code = int(next(g for g in m.groups() if g is not None))
    if code not in USER_FIXABLE_ERRNOS:
        return None
    where = next((m for m in (p.search(text) for p in _FILE_IN_TEXT) if m is not None), None)
    filename = where.group(1).split(_ORBAX_TMP)[0] if where else None
    return OSError(code, os.strerror(code), filename)


def describe(err: BaseException) -> str | None:
    """The one line the CLI prints for a user-fixable file-system error (None for any
    other error): the file when known, the system's words, what to do."""
    found = as_oserror(err)
    if found is None or found.errno is None:
        return None
    return f"{_what(found)}. {USER_FIXABLE_ERRNOS[found.errno]}"


def _what(found: OSError) -> str:
    where = f"'{found.filename}': " if found.filename else ""
    return f"{where}{found.strerror or first_line(found)}"


class _FailedWriteLog(logging.Filter):
    """orbax logs a failed background write with its traceback from each of its threads
    (up to dozens); the error reaches the caller anyway. Keeps one line of the first."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        found = as_oserror(failure) if failure is not None else None
        if found is None:
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg, record.args = f"writing a checkpoint failed: {_what(found)}", ()
        record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def quiet_failed_writes() -> Iterator[_FailedWriteLog]:
    """Inside: orbax's log of a failed write is one line, and the "Event loop is closed"
    tracebacks of the writes it abandoned (its other threads, handing their results to
    the loop it closed on the first error) are not printed: they say nothing the error
    does not. After a failure the hook stays, for the complaints of the same abandoned
    writes when the interpreter shuts down."""
    logger = logging.getLogger("absl")
    quiet = _FailedWriteLog()
    logger.addFilter(quiet)
    previous = sys.unraisablehook
    sys.unraisablehook = _without_abandoned_write_noise(previous)
    failed = False
    try:
        yield quiet
    except BaseException as err:
        failed = describe(err) is not None
        raise
    finally:
        logger.removeFilter(quiet)
        if not (quiet.seen or failed):
            sys.unraisablehook = previous


def _without_abandoned_write_noise(previous: Callable[[Any], object]) -> Callable[[Any], None]:
    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if isinstance(value, ImportError) and "Python is likely shutting down" in str(value):
            return
        previous(unraisable)

    return hook
