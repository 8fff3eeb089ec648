"""Multi-process start-up: one process per host, JAX's multi-controller runtime.

Which processes form the run, in order of precedence:
1. explicit flags `--coordinator HOST:PORT --num-processes N --process-id I`;
2. the environment variables `MMPO_COORDINATOR`, `MMPO_NUM_PROCESSES`, `MMPO_PROCESS_ID`
   (what `mmpo-jax launch` sets);
3. on a TPU VM or under SLURM (`SLURM_NTASKS` > 1), `jax.distributed.initialize()` with
   JAX's auto-detection;
4. otherwise one process.

Joining waits at most `--init-timeout` seconds (`MMPO_INIT_TIMEOUT`, default
`DEFAULT_INIT_TIMEOUT`) for the other processes, saying who waits for whom; then the
process stops with a one-line error (JAX's own timeout aborts the process with a C++
stack trace, so a watchdog of ours comes first).

After start-up every process hashes the resolved config and the package version;
`check_same_run` stops all of them with a clear message if any differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from mmpo_jax import __version__
from mmpo_jax.errors import UserError

ENV_COORDINATOR = "MMPO_COORDINATOR"
ENV_NUM_PROCESSES = "MMPO_NUM_PROCESSES"
ENV_PROCESS_ID = "MMPO_PROCESS_ID"
ENV_INIT_TIMEOUT = "MMPO_INIT_TIMEOUT"
# Seconds to wait for every process to join: TPU VMs of one slice start within a
# minute or two of each other.
DEFAULT_INIT_TIMEOUT = 300.0
# JAX's own deadline comes this much later than ours, so ours is the one that fires.
_JAX_TIMEOUT_MARGIN = 60


@dataclass(frozen=True)
class ProcessSpec:
    """How this process joins the run (`coordinator` None: auto-detect or single process)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: float = DEFAULT_INIT_TIMEOUT


def spec_from(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, environ: dict | None = None,
              init_timeout: float | None = None) -> ProcessSpec:
    """Flags first, then the MMPO_* environment variables; all three or none."""
    env = os.environ if environ is None else environ
    if init_timeout is None:
        text = env.get(ENV_INIT_TIMEOUT) or str(DEFAULT_INIT_TIMEOUT)
        try:
            init_timeout = float(text)
        except ValueError:
            raise UserError(f"{ENV_INIT_TIMEOUT}={text!r} must be a number of seconds") from None
    if not init_timeout > 0:
        raise UserError(f"--init-timeout {init_timeout}: must be > 0 seconds")
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID)
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise UserError(
            "a multi-process run needs all of --coordinator HOST:PORT, --num-processes N and --process-id I "
            f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got coordinator={coordinator}, "
            f"num_processes={num_processes}, process_id={process_id}"
        )
    if coordinator is not None and num_processes is not None and process_id is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"coordinator '{coordinator}' must look like HOST:PORT, e.g. 10.0.0.2:8476")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"process id {process_id} must be in [0, {num_processes}) (num_processes={num_processes})")
    return ProcessSpec(coordinator, num_processes, process_id, init_timeout)


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} must be an integer") from None


def cluster_detected(environ: dict | None = None) -> bool:
    """A TPU VM or a multi-task SLURM job, where `jax.distributed.initialize()` detects the rest."""
    env = os.environ if environ is None else environ
    tpu = bool(env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_ACCELERATOR_TYPE") or env.get("CLOUD_TPU_TASK_ID"))
    slurm = int(env.get("SLURM_NTASKS", "1") or "1") > 1
    return tpu or slurm


def initialize(spec: ProcessSpec) -> None:
    """Starts JAX's distributed runtime when the run has several processes (before any
    other JAX call)."""
    # lazy: `mmpo-jax launch` and the command line (`mmpo-jax train`) import this module without jax
    import jax

    if spec.coordinator is not None:
        if spec.num_processes == 1:
            return
        assert spec.num_processes is not None and spec.process_id is not None
        who = f"process {spec.process_id} of {spec.num_processes}"
        if spec.process_id == 0:
            waits = (f"{who}: serving the run at {spec.coordinator}, waiting up to {spec.init_timeout:.0f} s "
                     f"for the other {spec.num_processes - 1}")
            failed = (f"{who}: the other processes did not all join at {spec.coordinator} within "
                      f"{spec.init_timeout:.0f} s; start all {spec.num_processes} with --coordinator {spec.coordinator} "
                      "(and a reachable address), or raise --init-timeout")
        else:
            waits = f"{who}: joining the run at {spec.coordinator} (process 0), waiting up to {spec.init_timeout:.0f} s"
            failed = (f"{who}: the run at {spec.coordinator} did not form within {spec.init_timeout:.0f} s "
                      "(process 0 or another process is not there, or the address is unreachable); "
                      "check that every process was started with the same --coordinator, or raise --init-timeout")
        print(waits, file=sys.stderr, flush=True)
        with _watchdog(spec.init_timeout, failed):
            jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                                       process_id=spec.process_id,
                                       initialization_timeout=int(spec.init_timeout) + _JAX_TIMEOUT_MARGIN)
    elif cluster_detected():
        with _watchdog(spec.init_timeout, f"the processes of this TPU slice / SLURM job did not all join within "
                                          f"{spec.init_timeout:.0f} s; raise --init-timeout"):
            jax.distributed.initialize(initialization_timeout=int(spec.init_timeout) + _JAX_TIMEOUT_MARGIN)


@contextlib.contextmanager
def _watchdog(seconds: float, message: str) -> Iterator[None]:
    """Ends the process with `message` (exit 2) if the block runs past `seconds`. A start-up
    blocked in C++ cannot be interrupted from Python: only exiting ends it."""
    def expire() -> None:
        print(f"mmpo-jax: error: {message}", file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def run_fingerprint(config_yaml: str) -> str:
    return hashlib.sha256(f"{__version__}\n{config_yaml}".encode()).hexdigest()


def check_same_run(config_yaml: str) -> None:
    """Every process must run the same config with the same package version."""
    import jax  # lazy: see `initialize`
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return

    mine = np.frombuffer(bytes.fromhex(run_fingerprint(config_yaml))[:16], dtype=np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise UserError(
            f"processes {differ} run another config or mmpo-jax version than process 0; start every process "
            "with the same config file, overrides and package version"
        )
