"""Atomic writes (`mmpo_jax.files`): a failure mid-write leaves the old file and no temp file."""

import errno
import io
import os

import numpy as np
import pytest

from mmpo_jax import files


def test_a_full_disk_leaves_the_old_file_and_nothing_else(tmp_path, monkeypatch):
    target = tmp_path / "train-abc.npy"
    files.write_bytes_atomic(target, b"old table")
    os.chmod(target, 0o640)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        files.write_bytes_atomic(target, b"new table, never complete")
    assert target.read_bytes() == b"old table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-abc.npy"]
    monkeypatch.undo()
    # a complete write replaces it and keeps its permission bits
    table = np.arange(6, dtype=np.float32).reshape(3, 2)
    buffer = io.BytesIO()
    np.save(buffer, table)
    files.write_bytes_atomic(target, buffer.getvalue())
    assert np.array_equal(np.load(target), table) and oct(target.stat().st_mode & 0o777) == "0o640"
    files.write_text_atomic(tmp_path / "config.yaml", "loss:\n  name: mmpo\n")
    assert (tmp_path / "config.yaml").read_text(encoding="utf-8") == "loss:\n  name: mmpo\n"
