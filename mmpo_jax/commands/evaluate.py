"""`mmpo-jax eval CONFIG|RUN_DIR [key=value ...] [--json] [--capability] [--win-rate]`: metrics on the test data.

With a run directory, the policy of its latest checkpoint (under the run's own
config, overrides applied); with a config, the initial policy of that config
(before any training). Prints the metrics of the test split (`data.test_files`),
averaged over its pairs (`train.eval_batches` limits the batches; 0 = all).
`--capability` adds the capability probe's accuracy (LM-evaluation-harness's
multiple-choice `acc` and `acc_norm`, overall and per category, as `capability/*`);
without test data it prints only those.
`--win-rate` adds the judge-based win rate against the reference model (the model
the run started from; the output says which): greedy answers of both to the test
prompts (the first `--win-rate-limit`), each judged by the demo data's rule
(`mmpo_jax.data.demo_judge.judge`), as `win_rate/*` (`win_rate`, `judge_accuracy`,
`reference_judge_accuracy`, `wins`, `ties`, `losses`, `n`); `--save-generations
FILE` writes both answers and the verdicts of every prompt as JSON lines.
"""

from __future__ import annotations

import argparse
import sys

from mmpo_jax.eval.options import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, EvalOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run (or a config's initial model) on the test data",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("target", metavar="CONFIG|RUN_DIR")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--json", action="store_true",
                   help="print one strict JSON object (a metric that is not finite is null, as in metrics.jsonl)")
    add_capability_flags(p)
    p.add_argument("--capability-reference", action="store_true",
                   help="with --capability, also score the reference (base) model (capability_ref/*)")
    add_win_rate_flags(p)
    p.add_argument("--win-rate-batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                   help=f"prompts per generation batch (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--save-generations", default=None, metavar="FILE",
                   help="with --win-rate, write each prompt's policy and reference answers and verdicts (JSONL)")
    p.set_defaults(func=run)


def add_capability_flags(p: argparse.ArgumentParser) -> None:
    """--capability and its options (shared with `mmpo-jax sweep`)."""
    p.add_argument("--capability", action="store_true",
                   help="also score the policy on the capability probe (capability/acc, capability/acc_norm)")
    p.add_argument("--capability-template", choices=("plain", "chat"), default="plain",
                   help="probe prompt: LM-harness's 'Question: ...\\nAnswer:' (plain, default) "
                        "or the tokenizer's chat template (chat)")
    p.add_argument("--capability-file", default=None, metavar="JSONL",
                   help="probe items to use instead of the shipped probe")
    p.add_argument("--capability-limit", type=int, default=0, metavar="N",
                   help="score only the first N probe items (0 = all)")


def add_win_rate_flags(p: argparse.ArgumentParser) -> None:
    """--win-rate and its options (shared with `mmpo-jax sweep`)."""
    p.add_argument("--win-rate", action="store_true",
                   help="also the judge-based win rate of the policy against the reference model (win_rate/*)")
    p.add_argument("--win-rate-limit", type=int, default=0, metavar="N",
                   help="with --win-rate, answer only the first N test prompts (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"with --win-rate, most tokens per answer (default {DEFAULT_MAX_NEW_TOKENS})")


def run(args: argparse.Namespace) -> int:
    # lazy: the evaluation and train.metrics import jax and the model, which `mmpo-jax --help` does not need
    from mmpo_jax.eval.run import evaluate_trainer, load_target
    from mmpo_jax.train.metrics import json_line, make_record

    options = EvalOptions.from_args(args)
    options.check()
    trainer, step, what = load_target(args.target, args.overrides)

    def say(text: str) -> None:  # progress and notes: stderr, so that --json stays one object
        print(f"eval: {text}", file=sys.stderr, flush=True)

    result = evaluate_trainer(trainer, options, what=what, log=say)
    metrics = result.metrics
    if args.json:
        print(json_line(make_record(step, metrics)), end="")
        return 0
    preference = {k[len("eval/"):]: v for k, v in metrics.items() if k.startswith("eval/")}
    capability = {k: v for k, v in metrics.items() if k.startswith("capability")}
    win = {k: v for k, v in metrics.items() if k.startswith("win_rate/")}
    if preference:
        n, limit = result.num_test_pairs, trainer.cfg.train.eval_batches
        used = n if limit <= 0 else min(n, limit * trainer.cfg.data.batch_size)
        part = "" if used == n else f" (the first {used}: train.eval_batches={limit})"
        print(f"eval of {what} on {n} test pairs{part}")
        for k, v in preference.items():
            print(f"  {k:32s} {v:.6g}")
    if capability:
        print(f"capability probe of {what} ({options.capability_template} prompts; "
              f"{int(capability['capability/n'])} items, chance {capability['capability/chance']:.3f})")
        _print_metrics(capability)
    if win:
        print(f"win rate of {what} against {result.notes['win_rate/reference']} on {int(win['win_rate/n'])} "
              f"test prompts (greedy, at most {options.max_new_tokens} new tokens, judged by the demo rules)")
        _print_metrics(win)
        if "win_rate/generations" in result.notes:
            print(f"  generations written to {result.notes['win_rate/generations']}")
    return 0


def _print_metrics(metrics: dict[str, float]) -> None:
    """One `  key value` line per metric, the keys aligned."""
    width = max(32, *(len(k) for k in metrics))
    for k, v in metrics.items():
        print(f"  {k:{width}s} {v:.6g}")
