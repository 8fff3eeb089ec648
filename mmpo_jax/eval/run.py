"""What `mmpo-jax eval` and `mmpo-jax sweep` compute for a model: its options
(`EvalOptions`, from `mmpo_jax.eval.options`), the run-level evaluation of a trainer's policy (`evaluate_trainer`:
the test split's preference metrics, the capability probe, the judge-based win rate)
and the model it is run on (`load_target`: a run directory or a config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

from mmpo_jax.config import load_config, split_config_and_overrides
from mmpo_jax.data.probe import load_probe
from mmpo_jax.data.tokenizers import tokenizer_of
from mmpo_jax.errors import UserError
from mmpo_jax.eval.capability import flat_metrics, probe_accuracy
from mmpo_jax.eval.options import EvalOptions
from mmpo_jax.eval.win_rate import evaluate_win_rate, prefixed, write_generations
from mmpo_jax.train.preference_eval import evaluate
from mmpo_jax.train.run_data import attach_reference_tables, load_data
from mmpo_jax.train.run_restore import names_a_run, restore_inference
from mmpo_jax.train.setup import build_trainer, check_vocab

if TYPE_CHECKING:
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.train.run_data import RunData
    from mmpo_jax.train.setup import Evaluator

__all__ = ["EvalOptions", "EvalResult", "capability_metrics", "evaluate_trainer", "load_target"]


@dataclass
class EvalResult:
    """`metrics`: flat `eval/*`, `capability/*`, `capability_ref/*`, `win_rate/*` numbers;
    `notes`: what was evaluated, in words (e.g. `win_rate/reference`)."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    num_test_pairs: int = 0


def capability_metrics(options: EvalOptions, trainer: Evaluator, tokenizer: Tokenizer) -> dict[str, float]:
    """The `capability/*` (and with `capability_reference` `capability_ref/*`) numbers;
    `options`: an `EvalOptions` (or the parsed flags)."""
    if options.capability_limit < 0:
        raise UserError(f"--capability-limit={options.capability_limit}: must be >= 0 (0 = all items)")
    items = load_probe(options.capability_file)
    if options.capability_limit:
        items = items[: options.capability_limit]
    which: list[tuple[Literal["policy", "reference"], str]] = [("policy", "capability")]
    if options.capability_reference:
        which.append(("reference", "capability_ref"))
    out: dict[str, float] = {}
    for model, prefix in which:
        result = probe_accuracy(trainer, tokenizer, items, which=model, template=options.capability_template)
        out.update(flat_metrics(result, prefix))
    return out


def evaluate_trainer(trainer: Evaluator, options: EvalOptions, *, what: str = "the policy", data: RunData | None = None,
                     preference: dict[str, float] | None = None,
                     log: Callable[[str], None] | None = None) -> EvalResult:
    """Every metric `options` asks for, of `trainer`'s policy (as it is now).

    data: the run's `RunData` (default: loaded from the config; without test data only
    --capability works). preference: the test split's metrics already computed (e.g.
    the run's final eval), instead of evaluating again.
    """
    say = log or (lambda text: None)
    cfg = trainer.cfg
    with_test = cfg.data.test_files is not None
    if options.win_rate and cfg.data.test_files is None:
        raise UserError("--win-rate needs test prompts: set data.test_files (e.g. data.test_files=builtin:demo)")
    if not with_test and not options.capability:
        raise UserError("no test data: set data.test_files (e.g. data.test_files=builtin:demo)")
    run_data: RunData | None = None
    if with_test:
        run_data = load_data(cfg) if data is None else data
        if run_data.test is None:
            raise UserError("no test data: set data.test_files (e.g. data.test_files=builtin:demo)")
        tokenizer = run_data.tokenizer
    else:  # --capability alone: the probe needs only the tokenizer
        tokenizer = tokenizer_of(cfg.data, cfg.model.path)
    check_vocab(tokenizer, trainer.arch, cfg)
    test = run_data.test if run_data is not None else None
    result = EvalResult(num_test_pairs=len(test) if test is not None else 0)
    if options.capability:
        result.metrics.update(capability_metrics(options, trainer, tokenizer))
    if options.win_rate:
        wr = evaluate_win_rate(trainer, tokenizer, limit=options.win_rate_limit,
                               max_new_tokens=options.max_new_tokens, batch_size=options.win_rate_batch_size,
                               policy=what, log=say)
        result.metrics.update(prefixed(wr.metrics))
        result.notes["win_rate/policy"] = wr.policy
        result.notes["win_rate/reference"] = wr.reference
        if options.save_generations:
            write_generations(options.save_generations, wr)
            result.notes["win_rate/generations"] = str(options.save_generations)
    if run_data is not None and test is not None:
        if preference is None:
            if run_data.test_ref is None:  # not attached yet (a run's own data may have them)
                attach_reference_tables(cfg, trainer, run_data, say, splits=("test",))
            preference = evaluate(trainer, trainer.state, test, run_data.test_ref, cfg.train.eval_batches)
        result.metrics = {**{f"eval/{k}": v for k, v in preference.items()}, **result.metrics}
    return result


def load_target(target_text: str, overrides: list[str]) -> tuple[Evaluator, int, str]:
    """`(evaluator, step, description)` of a run directory (its latest checkpoint's policy
    and reference, no optimizer state: `restore_inference`) or a config (its initial model)."""
    if names_a_run(target_text):
        run, step = restore_inference(target_text, overrides, reference=True)
        return run, step, f"{target_text} (step {step})"
    path, rest = split_config_and_overrides([target_text, *overrides])
    cfg = load_config(path, rest)
    return build_trainer(cfg), 0, f"{target_text} (initial model)"
