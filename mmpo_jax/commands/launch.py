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
import sys

from mmpo_jax.commands.common import add_config_items, load_from_items
from mmpo_jax.errors import UserError
from mmpo_jax.launch import free_port, local_gpus, process_envs, start
from mmpo_jax.train.run_files import LAUNCH_LOGS_DIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run N training processes on this host (multi-process test or multi-GPU)",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-processes", type=int, required=True, metavar="N")
    add_config_items(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the run directory's layout (train.run_mirror) imports jax, which `mmpo-jax --help` does not need
    from mmpo_jax.train.run_mirror import RunFiles

    n = args.local_processes
    if n < 1:
        raise UserError(f"--local-processes {n} must be >= 1")
    if not args.items:
        raise UserError("give a config file: mmpo-jax launch --local-processes 2 configs/tiny.yaml")
    cfg = load_from_items(args.items)
    logs = RunFiles(cfg.train.output_dir).local / LAUNCH_LOGS_DIR  # a bucket run's: in its local mirror
    logs.mkdir(parents=True, exist_ok=True)
    envs = process_envs(n, free_port(), dict(os.environ), local_gpus())
    return start([sys.executable, "-m", "mmpo_jax.cli", "train", *args.items], envs, logs)
