"""Hyperparameter sweeps: a grid of runs, trained one after another, evaluated, summarised.

`mmpo-jax sweep` (`mmpo_jax.commands.sweep`) is the command line around `run_sweep`.

Runs and their names: `mmpo_jax.sweep_runs` (the grid, pure).

Resume. A run is skipped when its final checkpoint (`checkpoints/<max_steps>`) is
complete and its `eval.json` holds an eval with the same settings; with the
checkpoint but no such eval, it is only evaluated; otherwise `train` runs (or resumes
from the run's latest checkpoint). A run directory whose `config.yaml` differs from
the run's config (a changed base override) fails rather than being mixed in.

Per run, under `OUT/<name>/`: the run's own files (`config.yaml`, `metrics.jsonl`,
`checkpoints/`), `train.log` (its messages), `train_result.json` (steps, seconds),
`eval.json` (the metrics; see `eval_record`), `generations.jsonl` (with the win
rate), `error.txt` (a failed run's traceback).

Summary (written by `mmpo_jax.sweep_report`). `OUT/summary.csv` has one row per run
in run order (`SUMMARY_COLUMNS`, then a column per swept key the fixed ones do not
cover); floats with 4 decimals,
`seconds` (the training's wall time, which differs between reruns) with 1. The MMPO
keys (aux_weight, normalize, entropy_*) are blank for the other losses, which do not
use them. `status` is `ok` or `failed: <error>`. Plots: `win_rate_vs_capability.png`
(the shape of the MMPO paper's Figure 1) and `training_curves.png`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpo_jax.config import config_to_yaml, load_config
from mmpo_jax.errors import UserError
from mmpo_jax.eval.run import EvalOptions, evaluate_trainer
from mmpo_jax.files import write_text_atomic
from mmpo_jax.sweep_report import write_outputs
from mmpo_jax.sweep_runs import PRECISION, RESERVED_KEYS, Outcome, RunSpec, one_line
from mmpo_jax.train.checkpoint import CHECKPOINTS_DIR, incomplete_reason
from mmpo_jax.train.loop import train
from mmpo_jax.train.run_config import config_differences, with_run_length
from mmpo_jax.train.run_data import load_data
from mmpo_jax.train.run_restore import restore_run
from mmpo_jax.train.setup import build_trainer

if TYPE_CHECKING:
    from mmpo_jax.config_schema import RunConfig

EVAL_FILE = "eval.json"
TRAIN_RESULT_FILE = "train_result.json"
TRAIN_LOG_FILE = "train.log"
ERROR_FILE = "error.txt"
GENERATIONS_FILE = "generations.jsonl"


# --------------------------------------------------------------------------- #
# Files of a run
# --------------------------------------------------------------------------- #
def checkpoint_complete(run_dir: Path, step: int) -> bool:
    """Whether `run_dir/checkpoints/<step>` is a complete checkpoint."""
    step_dir = run_dir / CHECKPOINTS_DIR / str(step)
    return step_dir.is_dir() and incomplete_reason(step_dir) is None


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing or unreadable (a cut-off write)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic (`files.write_text_atomic`): an interrupted write leaves no half file."""
    write_text_atomic(path, json.dumps(data, indent=1, allow_nan=True) + "\n")


def eval_record(spec: RunSpec, cfg: RunConfig, settings: Mapping[str, Any], train_result: Mapping[str, Any],
                metrics: Mapping[str, float], notes: Mapping[str, str]) -> dict[str, Any]:
    """`eval.json` of a run: its name and overrides, the resolved loss config, the eval
    settings, the training's steps and seconds, and the flat metrics."""
    return {
        "run": spec.name,
        "overrides": dict(spec.overrides),
        "loss": dataclasses.asdict(cfg.loss),
        "eval_settings": dict(settings),
        "steps": train_result.get("steps"),
        "seconds": train_result.get("seconds"),
        "metrics": dict(metrics),
        "notes": dict(notes),
    }


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #
class SweepInterrupted(Exception):
    """Ctrl-C stopped a run's training (its checkpoint is saved); the sweep stops."""


@dataclass
class SweepSettings:
    """config: the base YAML (None: defaults); overrides: the sweep's own key=value;
    out: the sweep directory; eval_options: an `EvalOptions` (the eval flags)."""

    config: str | None
    overrides: list[str]
    out: Path
    eval_options: EvalOptions
    log: Callable[[str], None] = field(default=lambda text: print(text, flush=True))


def run_config(settings: SweepSettings, spec: RunSpec) -> RunConfig:
    """The resolved config of one run (a ConfigError for bad overrides)."""
    run_dir = settings.out / spec.name
    return load_config(settings.config, [*settings.overrides, *spec.override_list(),
                                         f"train.output_dir={run_dir}"])


def _file_logger(path: Path) -> Callable[[str], None]:
    def log(text: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return log


def run_one(settings: SweepSettings, spec: RunSpec, say: Callable[[str], None]) -> Outcome:
    """Trains (or resumes) and evaluates one run, or skips it when finished; see the
    module docstring. Errors propagate (the caller records them)."""
    cfg = run_config(settings, spec)
    run_dir = settings.out / spec.name
    options = settings.eval_options
    eval_settings = options.settings()
    data = None
    if cfg.train.max_steps is None:  # train.num_epochs: its length in steps needs the kept pairs
        data = load_data(cfg)
        cfg, _ = with_run_length(cfg, len(data.train))
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        diff = config_differences(config_file.read_text(), config_to_yaml(cfg), ignore=RESERVED_KEYS)
        if diff:
            raise UserError(f"{run_dir} holds a run of another config (differs in {', '.join(diff)}); "
                            "delete that directory or give the sweep another --out")
    stored = read_json(run_dir / EVAL_FILE)
    finished = checkpoint_complete(run_dir, cfg.train.steps)
    if finished and stored is not None and stored.get("eval_settings") == eval_settings:
        say("skipped (finished: final checkpoint and eval.json)")
        return Outcome(spec, "ok", stored, "skipped")

    run_dir.mkdir(parents=True, exist_ok=True)
    log = _file_logger(run_dir / TRAIN_LOG_FILE)
    trainer, preference = None, None
    try:
        if finished:
            say("evaluating (training finished earlier) ...")
            trainer, _ = restore_run(run_dir)
            action = "evaluated"
        else:
            say("training ...")
            data = load_data(cfg) if data is None else data
            trainer = build_trainer(cfg)
            result = train(cfg, log=log, trainer=trainer, data=data)
            if result.status == "interrupted":
                raise SweepInterrupted(f"{spec.name}: interrupted at step {result.step} (checkpoint saved)")
            write_json(run_dir / TRAIN_RESULT_FILE, {"steps": result.step, "seconds": result.seconds})
            preference = result.eval or None
            action = "trained"
            say(f"trained {result.step} steps in {result.seconds:.1f} s; evaluating ...")
        train_result = read_json(run_dir / TRAIN_RESULT_FILE) or {"steps": cfg.train.steps, "seconds": None}
        if options.win_rate:
            options = _with(options, save_generations=str(run_dir / GENERATIONS_FILE))
        metrics: dict[str, float] = {}
        notes: dict[str, str] = {}
        if cfg.data.test_files is not None or options.capability or options.win_rate:
            ev = evaluate_trainer(trainer, options, what=f"{spec.name}", data=data, preference=preference, log=log)
            metrics, notes = ev.metrics, ev.notes
    finally:
        del trainer, data
        gc.collect()
    record = eval_record(spec, cfg, eval_settings, train_result, metrics, notes)
    write_json(run_dir / EVAL_FILE, record)
    return Outcome(spec, "ok", record, action)


def _with(options: EvalOptions, **changes: Any) -> EvalOptions:
    return dataclasses.replace(options, **changes)


def run_sweep(settings: SweepSettings, runs: Sequence[RunSpec]) -> list[Outcome]:
    """Every run in order (see `run_one`); a failed run is recorded and the others go on.
    The summary and plots are written at the end (also after a Ctrl-C, for the runs done)."""
    settings.out.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    total = len(runs)
    try:
        for i, spec in enumerate(runs, 1):
            head = f"[{i}/{total}] {spec.name}"

            def say(text: str, head: str = head) -> None:
                settings.log(f"{head}: {text}")

            start = time.perf_counter()
            try:
                outcome = run_one(settings, spec, say)
            except (SweepInterrupted, KeyboardInterrupt):
                raise
            except Exception as err:  # noqa: BLE001 - any failure is recorded, the sweep goes on
                outcome = Outcome(spec, f"failed: {one_line(err)}", None, "failed")
                run_dir = settings.out / spec.name
                if run_dir.is_dir():
                    (run_dir / ERROR_FILE).write_text(traceback.format_exc())
                say(f"FAILED: {one_line(err)}")
            else:
                (settings.out / spec.name / ERROR_FILE).unlink(missing_ok=True)  # an earlier failure's
                if outcome.action != "skipped":
                    say(f"done in {time.perf_counter() - start:.1f} s: {headline(outcome.record)}")
            outcomes.append(outcome)
    finally:
        if outcomes:
            write_outputs(settings.out, outcomes, settings.log)
    return outcomes


def headline(record: Mapping[str, Any] | None) -> str:
    """The key metrics of an eval record in one line."""
    if not record:
        return "no metrics"
    m = record.get("metrics", {})
    parts = [(label, m.get(key)) for label, key in (
        ("eval loss", "eval/loss"), ("eval accuracy", "eval/rewards/accuracies"),
        ("win rate", "win_rate/win_rate"), ("judge accuracy", "win_rate/judge_accuracy"),
        ("capability acc", "capability/acc"))]
    return ", ".join(f"{label} {v:.{PRECISION}f}" for label, v in parts if v is not None) or "no metrics"
