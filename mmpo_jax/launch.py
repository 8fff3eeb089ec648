"""Several training processes on this host, joined through a coordinator on 127.0.0.1
(`mmpo-jax launch`, `mmpo_jax.commands.launch`).

Each process gets the MMPO_* environment variables that `mmpo_jax.distributed.spec_from`
reads and its share of the local devices: on CPU, `--xla_force_host_platform_device_count`
of the parent split N ways (1 device each without it); on GPUs, `CUDA_VISIBLE_DEVICES`
split N ways (`process_envs`). `start` runs them and waits: if a process fails, the others
are stopped and its exit status is returned.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmpo_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from mmpo_jax.errors import UserError

_CPU_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_gpus() -> list[str]:
    """This host's GPUs as `CUDA_VISIBLE_DEVICES` names them (`nvidia-smi -L` when unset; none without it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def process_envs(n: int, port: int, environ: dict[str, str], gpus: list[str]) -> list[dict[str, str]]:
    """The environment of each of the `n` processes (coordinator, id, its devices)."""
    envs = []
    flags = environ.get("XLA_FLAGS", "")
    m = _CPU_COUNT.search(flags)
    cpu_total = int(m.group(1)) if m else n
    if not gpus and cpu_total % n:
        raise UserError(f"{cpu_total} CPU devices do not split over {n} processes")
    if gpus and len(gpus) % n:
        raise UserError(f"{len(gpus)} GPUs ({','.join(gpus)}) do not split over {n} processes")
    for i in range(n):
        env = dict(environ)
        env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(n), ENV_PROCESS_ID: str(i)})
        if gpus:
            share = len(gpus) // n
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * share:(i + 1) * share])
        else:
            per = f"--xla_force_host_platform_device_count={cpu_total // n}"
            env["XLA_FLAGS"] = _CPU_COUNT.sub(per, flags) if m else f"{flags} {per}".strip()
        envs.append(env)
    return envs


def start(command: list[str], envs: list[dict[str, str]], logs: Path) -> int:
    """Runs `command` once per environment of `envs` and waits for all (`wait_all`): process
    0's output streamed, process i's written to `logs/process_<i>.log`. Ctrl-C and a
    preemption notice (SIGTERM) reach every process, so each saves at the same step."""
    procs: list[subprocess.Popen] = []
    files = []
    for i, env in enumerate(envs):
        if i == 0:
            procs.append(subprocess.Popen(command, env=env))
        else:
            f = open(logs / f"process_{i}.log", "w")
            files.append(f)
            procs.append(subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT))

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return wait_all(procs, logs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for f in files:
            f.close()


# exit statuses of a run that saved and stopped on a signal: SIGINT (130), SIGTERM (143)
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)
STOP_GRACE_S = 120.0  # how long the other processes may take to finish their save


def _wait_for_exit(p: subprocess.Popen, timeout: float) -> int | None:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def wait_all(procs: list[subprocess.Popen], logs: Path) -> int:
    """The run's exit status once every process ended: 0, the status of a signal stop that
    all of them made, or the first failure's (the others are then stopped)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed and all(c in STOPPED for _, c in failed):
            # stopped by a signal: the others stop at the same step once their save is done
            ended = [_wait_for_exit(p, STOP_GRACE_S) for p in procs]
            # a process that hung (counted as status 1) or failed: the rest are stopped below
            failed = [(i, 1 if c is None else c) for i, c in enumerate(ended)
                      if c is None or (c not in STOPPED and c != 0)]
            if not failed:
                return next(c for c in ended if c in STOPPED)
        if failed:
            i, code = failed[0]
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.time() + 30
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
            where = "" if i == 0 else f" (its output: {logs / f'process_{i}.log'})"
            print(f"mmpo-jax launch: process {i} exited with status {code}; stopped the others{where}",
                  file=sys.stderr)
            return code
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)
