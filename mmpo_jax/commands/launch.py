"""`mmpo-jax launch --local-processes N CONFIG [key=value ...]`: a multi-process run on this host.

Starts N `mmpo-jax train` processes joined through a coordinator on 127.0.0.1
(the MMPO_* environment variables), each with its share of the local devices:
on CPU, `--xla_force_host_platform_device_count` of the parent split N ways (1
device each without it); on GPUs, `CUDA_VISIBLE_DEVICES` split N ways. Process 0's
output is streamed; the others write `<train.output_dir>/logs/process_<i>.log`.
If a process fails, the others are stopped and its exit status is returned.
Ctrl-C is passed to every process (each saves its part of the checkpoint).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any
from pathlib import Path

from mmpo_jax.commands.common import add_config_items, load_from_items
from mmpo_jax.errors import UserError

_CPU_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run N training processes on this host (multi-process test or multi-GPU)",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-processes", type=int, required=True, metavar="N")
    add_config_items(p)
    p.set_defaults(func=run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_gpus() -> list[str]:
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
        env.update({"MMPO_COORDINATOR": f"127.0.0.1:{port}", "MMPO_NUM_PROCESSES": str(n),
                    "MMPO_PROCESS_ID": str(i)})
        if gpus:
            share = len(gpus) // n
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * share:(i + 1) * share])
        else:
            per = f"--xla_force_host_platform_device_count={cpu_total // n}"
            env["XLA_FLAGS"] = _CPU_COUNT.sub(per, flags) if m else f"{flags} {per}".strip()
        envs.append(env)
    return envs


def run(args: argparse.Namespace) -> int:
    n = args.local_processes
    if n < 1:
        raise UserError(f"--local-processes {n} must be >= 1")
    if not args.items:
        raise UserError("give a config file: mmpo-jax launch --local-processes 2 configs/tiny.yaml")
    cfg = load_from_items(args.items)
    from mmpo_jax.train.run_files import LAUNCH_LOGS_DIR
    from mmpo_jax.train.run_mirror import RunFiles

    logs = RunFiles(cfg.train.output_dir).local / LAUNCH_LOGS_DIR  # a bucket run's: in its local mirror
    logs.mkdir(parents=True, exist_ok=True)
    envs = process_envs(n, free_port(), dict(os.environ), local_gpus())
    command = [sys.executable, "-m", "mmpo_jax.cli", "train", *args.items]
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

    # Ctrl-C and a preemption notice reach every process: each saves at the same step
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(procs, logs)
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


def _wait(procs: list[subprocess.Popen], logs: Path) -> int:
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
