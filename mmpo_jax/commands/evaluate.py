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
(`mmpo_jax.data.demo_tasks.judge`), as `win_rate/*` (`win_rate`, `judge_accuracy`,
`reference_judge_accuracy`, `wins`, `ties`, `losses`, `n`); `--save-generations
FILE` writes both answers and the verdicts of every prompt as JSON lines.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmpo_jax.commands.common import split_config_and_overrides
from mmpo_jax.errors import UserError
from mmpo_jax.win_rate import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS


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


@dataclass
class EvalOptions:
    """What `evaluate_trainer` computes besides the preference metrics (the eval flags)."""

    capability: bool = False
    capability_reference: bool = False
    capability_template: str = "plain"
    capability_file: str | None = None
    capability_limit: int = 0
    win_rate: bool = False
    win_rate_limit: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    win_rate_batch_size: int = DEFAULT_BATCH_SIZE
    save_generations: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EvalOptions":
        names = [f for f in cls.__dataclass_fields__]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    def check(self) -> None:
        """A UserError naming the bad option, before anything is loaded."""
        if self.capability_reference and not self.capability:
            raise UserError("--capability-reference needs --capability")
        if self.capability_limit < 0:
            raise UserError(f"--capability-limit={self.capability_limit}: must be >= 0 (0 = all items)")
        if self.save_generations and not self.win_rate:
            raise UserError("--save-generations needs --win-rate")
        if self.win_rate_limit < 0:
            raise UserError(f"--win-rate-limit={self.win_rate_limit}: must be >= 0 (0 = every test prompt)")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens={self.max_new_tokens}: must be >= 1")
        if self.win_rate_batch_size < 1:
            raise UserError(f"--win-rate-batch-size={self.win_rate_batch_size}: must be >= 1")

    def settings(self) -> dict[str, Any]:
        """The options that change the numbers (not where generations are saved)."""
        out = asdict(self)
        out.pop("save_generations")
        out.pop("win_rate_batch_size")  # greedy answers do not depend on the batching
        return out


@dataclass
class EvalResult:
    """`metrics`: flat `eval/*`, `capability/*`, `capability_ref/*`, `win_rate/*` numbers;
    `notes`: what was evaluated, in words (e.g. `win_rate/reference`)."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    num_test_pairs: int = 0


def capability_metrics(options: Any, trainer, tokenizer) -> dict[str, float]:
    """The `capability/*` (and with `capability_reference` `capability_ref/*`) numbers;
    `options`: an `EvalOptions` (or the parsed flags)."""
    from mmpo_jax.capability import flat_metrics, probe_accuracy
    from mmpo_jax.data.probe import load_probe

    if options.capability_limit < 0:
        raise UserError(f"--capability-limit={options.capability_limit}: must be >= 0 (0 = all items)")
    items = load_probe(options.capability_file)
    if options.capability_limit:
        items = items[: options.capability_limit]
    which = [("policy", "capability")]
    if options.capability_reference:
        which.append(("reference", "capability_ref"))
    out: dict[str, float] = {}
    for model, prefix in which:
        result = probe_accuracy(trainer, tokenizer, items, which=model, template=options.capability_template)
        out.update(flat_metrics(result, prefix))
    return out


def evaluate_trainer(trainer: Any, options: EvalOptions, *, what: str = "the policy", data: Any = None,
                     preference: dict[str, float] | None = None,
                     log: Callable[[str], None] | None = None) -> EvalResult:
    """Every metric `options` asks for, of `trainer`'s policy (as it is now).

    data: the run's `RunData` (default: loaded from the config; without test data only
    --capability works). preference: the test split's metrics already computed (e.g.
    the run's final eval), instead of evaluating again.
    """
    from mmpo_jax.train.loop import attach_reference_tables, evaluate, load_data
    from mmpo_jax.train.setup import check_vocab

    say = log or (lambda text: None)
    cfg = trainer.cfg
    with_test = cfg.data.test_files is not None
    if options.win_rate and cfg.data.test_files is None:
        raise UserError("--win-rate needs test prompts: set data.test_files (e.g. data.test_files=builtin:demo)")
    if not with_test and not options.capability:
        raise UserError("no test data: set data.test_files (e.g. data.test_files=builtin:demo)")
    if with_test:
        data = load_data(cfg) if data is None else data
        if data.test is None:
            raise UserError("no test data: set data.test_files (e.g. data.test_files=builtin:demo)")
        tokenizer = data.tokenizer
    else:  # --capability alone: the probe needs only the tokenizer
        from mmpo_jax.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_vocab(tokenizer, trainer.arch, cfg)
    result = EvalResult(num_test_pairs=len(data.test) if with_test else 0)
    if options.capability:
        result.metrics.update(capability_metrics(options, trainer, tokenizer))
    if options.win_rate:
        from mmpo_jax.win_rate import evaluate_win_rate, prefixed, write_generations

        wr = evaluate_win_rate(trainer, tokenizer, limit=options.win_rate_limit,
                               max_new_tokens=options.max_new_tokens, batch_size=options.win_rate_batch_size,
                               policy=what, log=say)
        result.metrics.update(prefixed(wr.metrics))
        result.notes["win_rate/policy"] = wr.policy
        result.notes["win_rate/reference"] = wr.reference
        if options.save_generations:
            write_generations(options.save_generations, wr)
            result.notes["win_rate/generations"] = str(options.save_generations)
    if with_test:
        if preference is None:
            if data.test_ref is None:  # not attached yet (a run's own data may have them)
                attach_reference_tables(cfg, trainer, data, say, splits=("test",))
            preference = evaluate(trainer, trainer.state, data.test, data.test_ref, cfg.train.eval_batches)
        result.metrics = {**{f"eval/{k}": v for k, v in preference.items()}, **result.metrics}
    return result


def load_target(target_text: str, overrides: list[str]) -> tuple[Any, int, str]:
    """`(trainer, step, description)` of a run directory (its latest checkpoint) or a
    config (its initial model)."""
    from mmpo_jax.config import load_config
    from mmpo_jax.train.loop import restore_run
    from mmpo_jax.train.setup import build_trainer

    target = Path(target_text)
    if target.is_dir():
        trainer, step = restore_run(target, overrides)
        return trainer, step, f"{target} (step {step})"
    path, rest = split_config_and_overrides([target_text, *overrides])
    cfg = load_config(path, rest)
    return build_trainer(cfg), 0, f"{target_text} (initial model)"


def run(args: argparse.Namespace) -> int:
    options = EvalOptions.from_args(args)
    options.check()
    trainer, step, what = load_target(args.target, args.overrides)

    def say(text: str) -> None:  # progress and notes: stderr, so that --json stays one object
        print(f"eval: {text}", file=sys.stderr, flush=True)

    result = evaluate_trainer(trainer, options, what=what, log=say)
    metrics = result.metrics
    if args.json:
        from mmpo_jax.train.metrics import json_line, make_record

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
