"""Disk full and `ulimit -f` however they surface (`mmpo_jax.storage_errors`): Python's
OSError, or the errno in the text of orbax's (tensorstore's), safetensors' or arrow's
error, is one line of the CLI naming the file and what to do; any other error keeps its
traceback."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cpu_env import cli_env
from mmpo_jax import cli, storage_errors
from mmpo_jax.commands import show_config

ROOT = Path(__file__).resolve().parents[1]
STEP_TMP = "/runs/x/checkpoints/7.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0"
# as orbax raised them (ValueError), from a `ulimit -f` and a full tmpfs
TENSORSTORE_EFBIG = (f'OUT_OF_RANGE: Error writing "w/0.0" in OCDBT database at local file "{STEP_TMP}/": '
                     f'Failed writing: "{STEP_TMP}/d/4aee08": Failed to write 869396 bytes to file 7: '
                     "File too large [os_error_code='27']")
TENSORSTORE_ENOSPC = (f'RESOURCE_EXHAUSTED: Error writing "w21/0.0" in OCDBT database at local file "{STEP_TMP}/": '
                      f'Failed writing: "{STEP_TMP}/d/f9d55f": No space left on device [os_error_code=\'28\']')


@pytest.mark.parametrize("err, code, filename", [
    (ValueError(TENSORSTORE_EFBIG), errno.EFBIG, "/runs/x/checkpoints/7"),
    (ValueError(TENSORSTORE_ENOSPC), errno.ENOSPC, "/runs/x/checkpoints/7"),
    (Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
     errno.ENOSPC, None),
    (OSError("Error writing bytes to file. Detail: [errno 122] Disk quota exceeded"), errno.EDQUOT, None),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"), errno.ENOSPC,
     "/runs/x/metrics.jsonl"),
])
def test_the_errno_is_read_from_each_library_s_words(err, code, filename):
    found = storage_errors.as_oserror(err)
    assert found is not None and found.errno == code and found.filename == filename


def test_a_cause_counts_and_an_unrelated_context_does_not():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise KeyError("a bug while handling it")  # noqa: B904
    except KeyError as bug:
        assert storage_errors.as_oserror(bug) is None  # the bug keeps its traceback
    wrapped = RuntimeError("save of step 7 did not finish")
    wrapped.__cause__ = ValueError(TENSORSTORE_EFBIG)
    assert storage_errors.as_oserror(wrapped).errno == errno.EFBIG


@pytest.mark.parametrize("text", [
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.00GiB",  # XLA: device memory, no disk
    "OUT_OF_RANGE: index 9 is out of range",
    "Failed writing: \"/x\": Input/output error [os_error_code='5']",  # EIO: not the user's to fix
])
def test_other_statuses_are_not_disk_errors(text):
    assert storage_errors.as_oserror(ValueError(text)) is None


def _cli_raising(monkeypatch, err):
    def run(args):
        raise err

    monkeypatch.setattr(show_config, "run", run)
    return cli.main(["config"])


@pytest.mark.parametrize("err, line", [
    (OSError(errno.ENOSPC, "No space left on device"),
     "mmpo-jax: error: No space left on device. Free space on that disk"),  # was "error:: No space"
    (OSError(errno.ENOSPC, "No space left on device", "/r/m.jsonl"),
     "mmpo-jax: error: '/r/m.jsonl': No space left on device. Free space"),
    (ValueError(TENSORSTORE_EFBIG),
     "mmpo-jax: error: '/runs/x/checkpoints/7': File too large. The file outgrew a size limit (ulimit -f)"),
])
def test_the_cli_says_one_line(monkeypatch, capsys, err, line):
    assert _cli_raising(monkeypatch, err) == 2
    out = capsys.readouterr().err
    assert out.startswith(line) and out.count("\n") == 1, out


def test_any_other_error_keeps_its_traceback(monkeypatch):
    with pytest.raises(ValueError, match="OUT_OF_RANGE: index 9"):
        _cli_raising(monkeypatch, ValueError("OUT_OF_RANGE: index 9 is out of range"))
    with pytest.raises(OSError, match="Input/output"):
        _cli_raising(monkeypatch, OSError(errno.EIO, "Input/output error"))


def test_orbax_s_log_of_a_failed_write_is_one_line(caplog):
    """orbax logs the failure with its traceback from each of its threads: one line is kept."""
    logger = logging.getLogger("absl")
    with caplog.at_level(logging.ERROR, logger="absl"), storage_errors.quiet_failed_writes():
        for thread in ("array_type_handler", "write_metadata_after_commits", "save_finalize"):
            try:
                raise ValueError(TENSORSTORE_ENOSPC)
            except ValueError:
                logger.exception("[thread=%s] raised an exception", thread)
        logger.error("an unrelated error")
    records = [(r.getMessage(), r.exc_info) for r in caplog.records]
    assert records == [("writing a checkpoint failed: '/runs/x/checkpoints/7': No space left on device", None),
                       ("an unrelated error", None)]


# Runs argv[2:] under a file size limit of argv[1] bytes: SIGXFSZ ignored (it survives the
# exec) so that a write past the limit fails with EFBIG instead of killing the process. A
# wrapper rather than `preexec_fn`, which forks this multithreaded (JAX) process.
LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="no file size limits here")
def test_a_save_past_ulimit_f_stops_the_run_with_one_line(tmp_path):
    """`ulimit -f` (RLIMIT_FSIZE) smaller than a checkpoint's largest file: orbax's async save
    fails with OUT_OF_RANGE in its threads (before: 59 tracebacks, exit 1). Now: no
    traceback, one line naming the step that did not save, exit 2."""
    rows = "".join(f'{{"prompt": "q{i}", "chosen": " yes", "rejected": " no"}}\n' for i in range(16))
    (tmp_path / "pairs.jsonl").write_text(rows)
    out = tmp_path / "run"
    env = {k: v for k, v in cli_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}  # no XLA cache writes
    train = ["-m", "mmpo_jax.cli", "train", "configs/tiny.yaml", f"train.output_dir={out}", "train.max_steps=2",
             "train.save_every=1", "train.eval_every=0", f"data.train_files={tmp_path / 'pairs.jsonl'}",
             "data.test_files=null", f"data.cache_dir={tmp_path / 'cache'}"]
    # 300 kB: the embedding's file is ~460 kB, the metadata files a few kB
    proc = subprocess.run([sys.executable, "-c", LIMITED, "300000", *train], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"mmpo-jax: error: '{out / 'checkpoints' / '1'}': File too large. The file outgrew a size "
                    "limit (ulimit -f): raise it, then run the same command again."), proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "File too large" in line]
    assert len(said) <= 2, said  # the log line when it happened, and the error
    assert not (out / "checkpoints" / "1").exists()  # no half-written step looks complete
    assert os.path.getsize(out / "metrics.jsonl") > 0  # the run's log files are whole
