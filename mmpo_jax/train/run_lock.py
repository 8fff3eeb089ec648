"""One run at a time in an output directory: an exclusive lock held while a run writes.

Two runs on one `train.output_dir` race: each moves the other's in-flight checkpoint
aside as incomplete and both crash. The lock is `fcntl.flock` on the directory itself
(process 0 of a multi-process run takes it), so taking it writes nothing, and the
kernel releases it when its holder dies, however it dies. A run that really starts
`claim`s it: `<output_dir>/.lock` names the holder's pid and host for the message
that refuses a second run, and is removed when the run ends; one left by a run that
was killed is taken over with a notice.
"""

from __future__ import annotations

import json
import fcntl
import os
import socket
from pathlib import Path
from typing import Any, Callable

from mmpo_jax.errors import UserError
from mmpo_jax.files import write_text_atomic

HOLDER_FILE = ".lock"


class RunLock:
    """`with RunLock(output_dir, say) as lock:` holds the directory (a UserError if another
    process does); `lock.claim()` once the run starts writing."""

    def __init__(self, output_dir: str | os.PathLike, say: Callable[[str], None] | None = None) -> None:
        self.directory = Path(output_dir)
        self.holder_file = self.directory / HOLDER_FILE
        self._say = say or (lambda _: None)
        self._fd: int | None = None
        self._claimed = False

    def __enter__(self) -> RunLock:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(
                f"{self.directory} is in use by another run ({_describe(_read(self.holder_file))}); wait for it "
                "to finish or stop it, or give this run another train.output_dir"
            ) from None
        self._fd = fd
        return self

    def claim(self) -> None:
        """Records this process as the holder (a notice if a killed run's record was left)."""
        previous = _read(self.holder_file)
        if previous:
            self._say(f"taking over {self.directory} from a run that ended without releasing it "
                      f"({_describe(previous)})")
        write_text_atomic(self.holder_file, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        self._claimed = True

    def __exit__(self, *exc: Any) -> None:
        if self._fd is None:
            return
        if self._claimed:
            self.holder_file.unlink(missing_ok=True)
            self._claimed = False
        os.close(self._fd)  # closing releases the flock
        self._fd = None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "its pid is not recorded yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')}"
