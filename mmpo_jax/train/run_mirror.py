"""A run's small files when its `train.output_dir` is a bucket: a local mirror.

Checkpoints go to the bucket directly (orbax, through tensorstore), and so does the
precomputed reference table, which every process reads. The rest is written by process
0 a line or an event at a time, which an object store cannot do (no appends):
metrics.jsonl, TensorBoard's events, the trackers' state, config.yaml and
config_changes.jsonl. Those live in a local mirror, `<cache>/runs/<bucket>/<path>`
(`mmpo_jax.storage.cache_root`), which is made equal to the bucket's copy when the run
starts (`pull`) and copied back after every checkpoint and when the run ends (`push`).
So the bucket always holds the files of its latest checkpoint or later, which is what a
resume on another machine needs: records past the resumed step are dropped anyway.

For a local `train.output_dir` the mirror is that directory and both calls do nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mmpo_jax import storage
from mmpo_jax.storage import Location
from mmpo_jax.train.checkpoint import CHECKPOINTS_DIR, INCOMPLETE_DIR
from mmpo_jax.train.run_files import LAUNCH_LOGS_DIR
from mmpo_jax.train.run_lock import HOLDER_FILE

REFERENCE_DIR = "reference_logps"  # read by every process: kept in the bucket itself
# what the mirror never holds
_BUCKET_ONLY = (CHECKPOINTS_DIR, INCOMPLETE_DIR, REFERENCE_DIR)
# what stays on this machine: the lock, and `launch`'s logs, which its other processes
# are writing while process 0 pulls
_LOCAL_ONLY = (HOLDER_FILE, LAUNCH_LOGS_DIR)


def mirror_dir(url: str) -> Path:
    """The local mirror of the run at `url`."""
    return storage.cache_root() / "runs" / url[len(storage.GCS_PREFIX):].strip("/")


def _mirrored(rel: str) -> bool:
    top = rel.split("/", 1)[0]
    return top not in _BUCKET_ONLY and top not in _LOCAL_ONLY


class RunFiles:
    """Where a run's files go: `location` (the output dir as configured) for checkpoints
    and the reference table, `local` for the files process 0 writes piecemeal."""

    def __init__(self, output_dir: Location) -> None:
        self.location = output_dir
        self.remote = storage.is_url(output_dir)
        self.local = mirror_dir(str(output_dir)) if self.remote else Path(output_dir).expanduser()
        self._sent: dict[str, storage.FileStat] = {}

    def pull(self, say: Callable[[str], None]) -> None:
        """Makes the mirror equal to the bucket's files (what a previous run, on any
        machine, pushed); nothing for a local output dir. Call it holding the run's lock."""
        if not self.remote:
            return
        kept = [rel for rel in storage.file_stats(self.location) if _mirrored(rel)]
        for path in sorted(self.local.rglob("*"), reverse=True) if self.local.is_dir() else []:
            if path.is_file() and _mirrored(str(path.relative_to(self.local))):
                path.unlink()
        if kept:
            say(f"copying the run's {len(kept)} log file(s) from {self.location} to {self.local}")
        for rel in kept:
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(storage.join(self.location, *rel.split("/"))))
        self._sent = storage.file_stats(self.local)

    def push(self) -> None:
        """Copies the mirror's new and changed files to the bucket (process 0 calls it).
        Nothing once the bucket stopped answering (`storage.outage`): the run is stopping on
        that error, which names what was not saved, and a rerun pulls the bucket's files."""
        if not self.remote or not self.local.is_dir() or storage.outage() is not None:
            return
        now = storage.file_stats(self.local)
        changed = {rel for rel, st in now.items() if _mirrored(rel) and self._sent.get(rel) != st}
        storage.upload(self.local, str(self.location), only=changed.__contains__)
        self._sent.update({rel: now[rel] for rel in changed})
