"""`mmpo-jax sweep CONFIG [key=value ...] --grid KEY=[V1,V2,...] [--grid ...] [--also "KEY=V ..."] [--out DIR]
[--win-rate] [--capability]`: train and evaluate a grid of runs, one after another.

The runs are the cartesian product of the `--grid` axes (the first varies slowest);
each `--also "KEY=V KEY=V"` adds every grid combination with these overrides on
top, duplicates dropped: `--grid loss.name=[mmpo,dpo,simpo] --grid
loss.beta=[0.01,0.1,1.0] --also "loss.name=mmpo loss.aux_weight=0"` is 9 runs plus
one MMPO run per beta without the auxiliary term. The sweep's own `key=value`
overrides apply to every run, before the grid's.

Each run trains in `DIR/<name>` (`mmpo-beta0.1`, `mmpo-beta0.1-aux_weight0`), then is
evaluated on the test split (preference metrics; `--capability`: the probe's acc
and acc_norm; `--win-rate`: the judge-based win rate against the reference model),
saved to `DIR/<name>/eval.json`. A run whose final checkpoint and eval.json exist is
skipped, so an interrupted sweep resumes where it stopped. A failed run is recorded
(summary.csv's `status`) and the others go on; the exit status is then 1.

Writes `DIR/summary.csv` (a row per run), `DIR/win_rate_vs_capability.png` (the MMPO
paper's Figure 1: win rate against capability accuracy, a point per run coloured by
loss and labelled with its beta; eval rewards/accuracies against eval loss when the
win rate or capability was not computed) and `DIR/training_curves.png` (each run's
train loss per step). `--dry-run` lists the runs, resolves each one's config (naming any
bad override, such as a misspelt key) and exits: 0 if all are valid, 2 if not.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmpo_jax.commands.evaluate import add_capability_flags, add_win_rate_flags
from mmpo_jax.errors import INTERRUPTED_EXIT, UserError
from mmpo_jax.eval.options import EvalOptions
from mmpo_jax.sweep_runs import RunSpec, expand, parse_also, parse_grid

if TYPE_CHECKING:  # the CLI imports the sweep machinery only when it runs
    from mmpo_jax.sweep import SweepSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train and evaluate a grid of runs (loss x beta, ablations), then summarise",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="the base YAML config of every run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                   help="an axis of the grid (repeat for more axes)")
    p.add_argument("--also", action="append", default=[], metavar='"KEY=V [KEY=V ...]"',
                   help="extra runs: every grid combination with these overrides on top (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the sweep directory (default: sweeps/<config name>)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their overrides, check their configs, run nothing")
    add_win_rate_flags(p)
    add_capability_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the sweep imports jax and the trainer, which `mmpo-jax --help` does not need
    from mmpo_jax.sweep import SweepInterrupted, SweepSettings, run_sweep

    config = Path(args.config)
    if "=" in args.config:
        raise UserError(f"sweep: the first argument must be a config file, got the override {args.config!r}")
    if not config.is_file():
        raise UserError(f"sweep: no such config file '{args.config}'")
    runs = expand([parse_grid(g) for g in args.grid], [parse_also(a) for a in args.also])
    options = EvalOptions.from_args(args)
    options.check()
    out = Path(args.out) if args.out else Path("sweeps") / config.stem
    settings = SweepSettings(config=str(config), overrides=list(args.overrides), out=out, eval_options=options)
    if args.dry_run:
        return _dry_run(settings, runs)
    print(f"sweep of {len(runs)} run{'s' if len(runs) != 1 else ''} of {config} into {out}", flush=True)
    try:
        outcomes = run_sweep(settings, runs)
    except (SweepInterrupted, KeyboardInterrupt) as err:
        print(f"sweep interrupted{': ' + str(err) if str(err) else ''}; run the same command again to resume",
              flush=True)
        return INTERRUPTED_EXIT
    return 0 if all(o.status == "ok" for o in outcomes) else 1


def _dry_run(settings: SweepSettings, runs: Sequence[RunSpec]) -> int:
    """Lists the runs; a run whose config does not resolve gets its error beneath it (the
    real sweep would record it as failed and go on)."""
    from mmpo_jax.sweep import run_config  # lazy: as in `run`

    bad = 0
    for i, spec in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {spec.name}: {' '.join(spec.override_list()) or '(no overrides)'} "
              f"-> {settings.out / spec.name}")
        try:
            run_config(settings, spec)
        except UserError as err:
            bad += 1
            print(f"    invalid config: {err}")
    if bad:
        print(f"{bad} of {len(runs)} runs have an invalid config")
    return 2 if bad else 0
