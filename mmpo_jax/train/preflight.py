"""The checks a run can make in a moment, before it spends time loading anything.

A wrong path or an impossible batch should stop a run at once, not after the model
has been read and the step-0 eval has run: `check_paths` looks at every path the
config names (data files, model and reference checkpoints, the output directory)
without reading them, and `check_batch_fits` runs as soon as the data is tokenized,
before the model is built.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from mmpo_jax import storage
from mmpo_jax.data.sources import local_data_file, source_specs
from mmpo_jax.errors import UserError
from mmpo_jax.models.pretrained import resolve_checkpoint_path
from mmpo_jax.train.checkpoint import CHECKPOINTS_DIR

if TYPE_CHECKING:
    from mmpo_jax.data.pipeline import PreferenceData
    from mmpo_jax.config_schema import RunConfig

def check_paths(cfg: RunConfig) -> None:
    """Every path of `cfg` exists where it must; a UserError naming the key otherwise.

    A hub id is resolved here too (downloaded, or found in the HF cache), so an unknown
    id or an unreachable hub is reported before the data is tokenized.
    """
    out = cfg.train.output_dir
    if not out.strip():
        raise UserError("train.output_dir is empty: name the run's directory, e.g. train.output_dir=runs/my-run")

    if storage.is_url(out):
        storage.check_bucket(out, "train.output_dir")
    else:
        check_local_output_dir(out)

    for which in ("train", "test"):
        for src in source_specs(cfg.data, which):
            local_data_file(src)

    for key, spec in (("model.path", cfg.model.path), ("model.reference_path", cfg.model.reference_path)):
        if spec:
            try:
                resolve_checkpoint_path(spec)
            except UserError as err:
                raise UserError(f"{key}={spec!r}: {err}") from None


# Kernel file systems whose files are views of the kernel, not storage: a run's directory
# cannot be made there (mkdir fails late with ENOENT or EPERM, after the model is loaded).
PSEUDO_FILE_SYSTEMS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
                                 "configfs", "bpf", "pstore", "efivarfs", "fusectl", "devpts", "mqueue"})


def check_local_output_dir(out: str) -> None:
    """`train.output_dir` on this machine can become a run's directory: it is a directory or
    does not exist yet, lies on a file system that stores files, and neither it nor its
    `checkpoints` is a symlink to nothing (mkdir fails on one with FileExistsError)."""
    path = Path(out).expanduser()
    if path.is_file():
        raise UserError(f"train.output_dir={out!r} is a file, not a directory: choose another train.output_dir")
    if path.exists() and not path.is_dir():
        raise UserError(f"train.output_dir={out!r} is {_kind(path)}, not a directory: "
                        "choose another train.output_dir")
    fs = _file_system_type(path)
    if fs in PSEUDO_FILE_SYSTEMS:
        raise UserError(f"train.output_dir={out!r} is on the kernel's '{fs}' file system, which cannot hold "
                        "a run's files: choose a directory on a disk")

    for link, what in ((path, "train.output_dir"), (path / CHECKPOINTS_DIR, "the run's checkpoints")):
        if link.is_symlink() and not link.exists():
            raise UserError(f"'{link}' is a symlink to '{os.readlink(link)}', which does not exist: create that "
                            f"directory ({what} go there), or remove the link")


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a directory"


def _file_system_type(path: Path) -> str | None:
    """The type of the file system that holds `path` (or would: its nearest existing
    ancestor), from /proc/self/mounts; None where that is not readable (not Linux)."""
    existing = Path(os.path.realpath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fs = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # mount points escape a space as \040 (and tab, newline, backslash alike)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = existing == Path(point) or Path(point) in existing.parents
        if inside and len(point) >= len(best):
            best, fs = point, fields[2]
    return fs


def check_batch_fits(train: PreferenceData, batch_size: int) -> None:
    """At least one global batch of `data.batch_size` pairs among the kept training rows."""
    if len(train) < batch_size:
        raise UserError(
            f"data.batch_size={batch_size} is larger than the {len(train)} training rows kept: "
            f"lower data.batch_size to at most {len(train)}, or add training data"
        )
