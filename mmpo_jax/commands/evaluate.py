"""`mmpo-jax eval CONFIG|RUN_DIR [key=value ...] [--json] [--capability]`: the preference metrics on the test data.

With a run directory, the policy of its latest checkpoint (under the run's own
config, overrides applied); with a config, the initial policy of that config
(before any training). Prints the metrics of the test split (`data.test_files`),
averaged over its pairs (`train.eval_batches` limits the batches; 0 = all).
`--capability` adds the capability probe's accuracy (LM-evaluation-harness's
multiple-choice `acc` and `acc_norm`, overall and per category, as `capability/*`);
without test data it prints only those.
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
    p.add_argument("--capability", action="store_true",
                   help="also score the policy on the capability probe (capability/acc, capability/acc_norm)")
    p.add_argument("--capability-reference", action="store_true",
                   help="with --capability, also score the reference (base) model (capability_ref/*)")
    p.add_argument("--capability-template", choices=("plain", "chat"), default="plain",
                   help="probe prompt: LM-harness's 'Question: ...\\nAnswer:' (plain, default) "
                        "or the tokenizer's chat template (chat)")
    p.add_argument("--capability-file", default=None, metavar="JSONL",
                   help="probe items to use instead of the shipped probe")
    p.add_argument("--capability-limit", type=int, default=0, metavar="N",
                   help="score only the first N probe items (0 = all)")
    p.set_defaults(func=run)


def capability_metrics(args: argparse.Namespace, trainer, tokenizer) -> dict[str, float]:
    """The `capability/*` (and with --capability-reference `capability_ref/*`) numbers."""
    from mmpo_jax.capability import flat_metrics, probe_accuracy
    from mmpo_jax.data.probe import load_probe

    if args.capability_limit < 0:
        raise UserError(f"--capability-limit={args.capability_limit}: must be >= 0 (0 = all items)")
    items = load_probe(args.capability_file)
    if args.capability_limit:
        items = items[: args.capability_limit]
    which = [("policy", "capability")]
    if args.capability_reference:
        which.append(("reference", "capability_ref"))
    out: dict[str, float] = {}
    for model, prefix in which:
        result = probe_accuracy(trainer, tokenizer, items, which=model, template=args.capability_template)
        out.update(flat_metrics(result, prefix))
    return out


def run(args: argparse.Namespace) -> int:
    from mmpo_jax.config import load_config
    from mmpo_jax.train.loop import attach_reference_tables, evaluate, load_data, restore_run
    from mmpo_jax.train.setup import build_trainer, check_vocab

    if args.capability_reference and not args.capability:
        raise UserError("--capability-reference needs --capability")
    target = Path(args.target)
    if target.is_dir():
        trainer, step = restore_run(target, args.overrides)
        what = f"{target} (step {step})"
    else:
        path, overrides = split_config_and_overrides([args.target, *args.overrides])
        cfg = load_config(path, overrides)
        trainer, step, what = build_trainer(cfg), 0, f"{args.target} (initial model)"
    cfg = trainer.cfg
    with_test = not (args.capability and cfg.data.test_files is None)
    if with_test:
        data = load_data(cfg)
        if data.test is None:
            raise UserError("no test data: set data.test_files (e.g. data.test_files=builtin:demo)")
        tokenizer = data.tokenizer
    else:  # --capability alone: the probe needs only the tokenizer
        from mmpo_jax.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_vocab(tokenizer, trainer.arch, cfg)
    capability: dict[str, float] = {}
    if args.capability:
        # before the reference tables: they release the precomputed mode's reference model
        capability = capability_metrics(args, trainer, tokenizer)
    metrics: dict[str, float] = {}
    if with_test:
        attach_reference_tables(cfg, trainer, data, lambda text: None)
        metrics = evaluate(trainer, trainer.state, data.test, data.test_ref, cfg.train.eval_batches)
    if args.json:
        print(json.dumps({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}, **capability}))
    else:
        if with_test:
            print(f"eval of {what} on {len(data.test)} test pairs")
            for k, v in metrics.items():
                print(f"  {k:32s} {v:.6g}")
        if capability:
            print(f"capability probe of {what} ({args.capability_template} prompts; "
                  f"{int(capability['capability/n'])} items, chance {capability['capability/chance']:.3f})")
            width = max(32, *(len(k) for k in capability))
            for k, v in capability.items():
                print(f"  {k:{width}s} {v:.6g}")
    return 0
