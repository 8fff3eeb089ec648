"""`mmpo-jax train CONFIG [key=value ...]`: run (or resume) a training run.

Writes to `train.output_dir`: `config.yaml` (the resolved config), `metrics.jsonl`,
`tensorboard/`, `checkpoints/<step>/`. Running the same command again resumes from
the latest complete checkpoint. Ctrl-C saves a checkpoint and exits (status 130); so
does SIGTERM, a preemption notice (status 143).
A resume that changes the objective, the optimizer or the data (anything but how long,
how often and where the run logs, evaluates and saves, the mesh, and how the same
numbers are computed) is refused unless `--allow-config-change`, which records the
change in `config_changes.jsonl`. One run at a time writes to an output directory.

Several processes (one per host): `--coordinator HOST:PORT --num-processes N
--process-id I` on each, or the MMPO_COORDINATOR / MMPO_NUM_PROCESSES /
MMPO_PROCESS_ID environment variables (`mmpo-jax launch` sets them); on a TPU VM
or under SLURM, detected. Only process 0 writes logs and metrics; all join
checkpoint saves.
"""

from __future__ import annotations

import argparse

from mmpo_jax import distributed
from mmpo_jax.commands.common import add_config_items, load_from_items
from mmpo_jax.errors import INTERRUPTED_EXIT


def add_process_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    p.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    p.add_argument("--init-timeout", type=float, metavar="SECONDS",
                   help="how long to wait for every process to join (default 300; MMPO_INIT_TIMEOUT)")


def start_processes(args: argparse.Namespace) -> None:
    distributed.initialize(distributed.spec_from(args.coordinator, args.num_processes, args.process_id,
                                                 init_timeout=args.init_timeout))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a run from a config",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_items(p)
    add_process_flags(p)
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run with a changed loss, optimizer or data config (recorded in the run)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmpo_jax.train.loop import train  # lazy: the trainer imports jax, which `mmpo-jax --help` does not need

    if not args.items:
        raise SystemExit("mmpo-jax train: give a config file, e.g. `mmpo-jax train configs/demo.yaml`")
    cfg = load_from_items(args.items)  # config errors before any process waits on another
    start_processes(args)
    result = train(cfg, allow_config_change=args.allow_config_change)
    return (result.exit_status or INTERRUPTED_EXIT) if result.status == "interrupted" else 0
