"""Multi-process start-up: one process per host, JAX's multi-controller runtime.

Which processes form the run, in order of precedence:
1. explicit flags `--coordinator HOST:PORT --num-processes N --process-id I`;
2. the environment variables `MMPO_COORDINATOR`, `MMPO_NUM_PROCESSES`, `MMPO_PROCESS_ID`
   (what `mmpo-jax launch` sets);
3. on a TPU VM or under SLURM (`SLURM_NTASKS` > 1), `jax.distributed.initialize()` with
   JAX's auto-detection;
4. otherwise one process.

After start-up every process hashes the resolved config and the package version;
`check_same_run` stops all of them with a clear message if any differs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from mmpo_jax.errors import UserError

ENV_COORDINATOR = "MMPO_COORDINATOR"
ENV_NUM_PROCESSES = "MMPO_NUM_PROCESSES"
ENV_PROCESS_ID = "MMPO_PROCESS_ID"


@dataclass(frozen=True)
class ProcessSpec:
    """How this process joins the run (`coordinator` None: auto-detect or single process)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def spec_from(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, environ: dict | None = None) -> ProcessSpec:
    """Flags first, then the MMPO_* environment variables; all three or none."""
    env = os.environ if environ is None else environ
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
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"coordinator '{coordinator}' must look like HOST:PORT, e.g. 10.0.0.2:8476")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"process id {process_id} must be in [0, {num_processes}) (num_processes={num_processes})")
    return ProcessSpec(coordinator, num_processes, process_id)


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
    import jax

    if spec.coordinator is not None:
        if spec.num_processes == 1:
            return
        jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                                   process_id=spec.process_id)
    elif cluster_detected():
        jax.distributed.initialize()


def run_fingerprint(config_yaml: str) -> str:
    from mmpo_jax import __version__

    return hashlib.sha256(f"{__version__}\n{config_yaml}".encode()).hexdigest()


def check_same_run(config_yaml: str) -> None:
    """Every process must run the same config with the same package version."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.frombuffer(bytes.fromhex(run_fingerprint(config_yaml))[:16], dtype=np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise UserError(
            f"processes {differ} run another config or mmpo-jax version than process 0; start every process "
            "with the same config file, overrides and package version"
        )
