"""A multi-process start whose peers never come: who waits for whom, then one line at
`--init-timeout` (JAX's own timeout aborted with a C++ stack after ~5 minutes)."""

import socket
import subprocess
import sys
import time

import pytest

from cpu_env import cli_env
from mmpo_jax.distributed import DEFAULT_INIT_TIMEOUT, spec_from
from mmpo_jax.errors import UserError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("process_id, waits", [(0, "waiting up to 3 s for the other 1"),
                                               (1, "joining the run at 127.0.0.1:")])
def test_a_start_whose_peers_never_come_ends_in_one_line(process_id, waits):
    coordinator = f"127.0.0.1:{_free_port()}"
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "mmpo_jax.cli", "train", "configs/tiny.yaml", "--coordinator", coordinator,
         "--num-processes", "2", "--process-id", str(process_id), "--init-timeout", "3"],
        env=cli_env(1), capture_output=True, text=True, timeout=120,
    )
    seconds = time.time() - start
    assert done.returncode == 2, done.stderr[-2000:]
    assert waits in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("mmpo-jax: error:")]
    assert len(errors) == 1 and "within 3 s" in errors[0] and "--init-timeout" in errors[0], done.stderr
    assert "CoordinationServiceAgent" not in done.stderr and "@ " not in done.stderr, done.stderr[-2000:]
    assert seconds < 60, seconds  # JAX's own deadline is 60 s after ours


def test_the_timeout_comes_from_the_flag_the_variable_or_the_default():
    assert spec_from(environ={}).init_timeout == DEFAULT_INIT_TIMEOUT
    assert spec_from(environ={"MMPO_INIT_TIMEOUT": "42.5"}).init_timeout == 42.5
    assert spec_from(environ={"MMPO_INIT_TIMEOUT": "42"}, init_timeout=7).init_timeout == 7
    with pytest.raises(UserError, match="must be > 0"):
        spec_from(environ={}, init_timeout=0)
    with pytest.raises(UserError, match="MMPO_INIT_TIMEOUT='soon'"):
        spec_from(environ={"MMPO_INIT_TIMEOUT": "soon"})
