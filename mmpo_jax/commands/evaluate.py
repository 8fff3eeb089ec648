"""`mmpo-jax eval CONFIG|RUN_DIR [key=value ...] [--json]`: the preference metrics on the test data.

With a run directory, the policy of its latest checkpoint (under the run's own
config, overrides applied); with a config, the initial policy of that config
(before any training). Prints the metrics of the test split (`data.test_files`),
averaged over its pairs (`train.eval_batches` limits the batches; 0 = all).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmpo_jax.commands.common import split_config_and_overrides
from mmpo_jax.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run (or a config's initial model) on the test data",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("target", metavar="CONFIG|RUN_DIR")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmpo_jax.config import load_config
    from mmpo_jax.train.loop import attach_reference_tables, evaluate, load_data, restore_run
    from mmpo_jax.train.setup import build_trainer, check_vocab

    target = Path(args.target)
    if target.is_dir():
        trainer, step = restore_run(target, args.overrides)
        what = f"{target} (step {step})"
    else:
        path, overrides = split_config_and_overrides([args.target, *args.overrides])
        cfg = load_config(path, overrides)
        trainer, step, what = build_trainer(cfg), 0, f"{args.target} (initial model)"
    cfg = trainer.cfg
    data = load_data(cfg)
    if data.test is None:
        raise UserError("no test data: set data.test_files (e.g. data.test_files=builtin:demo)")
    check_vocab(data.tokenizer, trainer.arch, cfg)
    attach_reference_tables(cfg, trainer, data, lambda text: None)
    metrics = evaluate(trainer, trainer.state, data.test, data.test_ref, cfg.train.eval_batches)
    if args.json:
        print(json.dumps({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}))
    else:
        print(f"eval of {what} on {len(data.test)} test pairs")
        for k, v in metrics.items():
            print(f"  {k:32s} {v:.6g}")
    return 0
