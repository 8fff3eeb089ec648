"""`mmpo-jax plot RUN_DIR... [--out FILE.png] [--metrics loss,eval/rewards/accuracies]`:
training and eval curves of runs from their `metrics.jsonl`, one panel per metric, the
runs overlaid and labelled. Default metrics: loss, eval/loss and eval/rewards/accuracies
(those the runs have). Default output: RUN_DIR/curves.png for one run; several runs need
--out."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmpo_jax.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="training and eval curves of one or more runs (a PNG)",
                       description=__doc__.split("\n", 1)[1] if __doc__ else None)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE.png", help="where to write the plot (default RUN_DIR/curves.png)")
    p.add_argument("--metrics", metavar="A,B,...", help="the metrics, comma separated, one panel each")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the plots import matplotlib and train.metrics (jax), which `mmpo-jax --help` does not need
    from mmpo_jax.run_plots import plot_runs

    run_dirs = [Path(d) for d in args.run_dirs]
    if args.out:
        out = Path(args.out)
    elif len(run_dirs) == 1:
        out = run_dirs[0] / "curves.png"
    else:
        raise UserError("plot: several runs go into one file: give --out FILE.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"plot: --out {out}: the plot is a PNG; name a .png file")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if args.metrics is not None and not metrics:
        raise UserError("plot: --metrics names no metric; e.g. --metrics loss,eval/rewards/accuracies")
    plotted = plot_runs(run_dirs, out, metrics)
    print(f"wrote {out}: {', '.join(plotted)} of {len(run_dirs)} run{'s' if len(run_dirs) != 1 else ''}")
    return 0
