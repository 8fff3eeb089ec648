"""Hyperparameter sweeps: a grid of runs, trained one after another, evaluated, summarised.

`mmpo-jax sweep` (`mmpo_jax.commands.sweep`) is the command line around `run_sweep`.

Runs. Each `--grid KEY=[V1,V2,...]` is an axis; the runs are the cartesian product
of the axes (the first axis varies slowest). Each `--also "KEY=V KEY=V ..."` adds
ablation runs: every grid combination with these overrides applied on top (they
replace the combination's values for their keys), duplicates dropped. So with
`--grid loss.name=[mmpo,dpo,simpo] --grid loss.beta=[0.1,1.0]`,
`--also "loss.name=mmpo loss.aux_weight=0"` adds one run per beta: `mmpo-beta0.1-aux_weight0`
and `mmpo-beta1.0-aux_weight0` (the dpo and simpo combinations become the same
mmpo runs). The overrides of a run apply after the config's and the sweep's own
`key=value` overrides; `train.output_dir` is set to `OUT/<name>`.

Names. A run's name joins its overrides in order with '-': `loss.name`'s and
`loss.loss_type`'s values alone (`dpo-ipo`, `dpo-sigmoid_sft` for `[sigmoid,sft]`), a number as key+value (`beta0.1`), other values as key_value
(`normalize_none`). The key is its last part (`aux_weight`), or the whole key with
'_' for '.' when two swept keys share a last part. No overrides at all: `base`.

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

import gc
import itertools
import json
import re
import shlex
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpo_jax.errors import UserError
from mmpo_jax.eval.run import EvalOptions
from mmpo_jax.files import write_text_atomic

if TYPE_CHECKING:
    from mmpo_jax.config_schema import RunConfig

EVAL_FILE = "eval.json"
TRAIN_RESULT_FILE = "train_result.json"
TRAIN_LOG_FILE = "train.log"
ERROR_FILE = "error.txt"
GENERATIONS_FILE = "generations.jsonl"
PRECISION = 4  # decimals of the summary's floats
RESERVED_KEYS = ("train.output_dir",)  # set by the sweep for each run

Overrides = tuple[tuple[str, str], ...]  # ordered (key, value text) pairs


# --------------------------------------------------------------------------- #
# Grid and names (pure)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Axis:
    """One `--grid KEY=[V1,...]`: a config key and its values as override text."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its directory name and its overrides, in order."""

    name: str
    overrides: Overrides

    def override_list(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides]

    def value(self, key: str) -> str | None:
        return dict(self.overrides).get(key)


def split_values(text: str) -> list[str]:
    """The values of `[a,b,c]` (commas inside nested brackets or braces stay, so
    `[[q,v],[q,k,v]]` gives `[q,v]` and `[q,k,v]`); text without brackets is one value."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [text]
    inner, parts, depth, start = text[1:-1], [], 0, 0
    for i, ch in enumerate(inner):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [p.strip() for p in parts]


def _key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key):
        raise UserError(f"{flag} {text!r}: expected section.key=value (e.g. loss.beta=0.1)")
    if key in RESERVED_KEYS:
        raise UserError(f"{flag} {text!r}: the sweep sets {key} itself (OUT/<run name>); use --out")
    return key, value.strip()


def parse_grid(text: str) -> Axis:
    """`--grid KEY=[V1,V2,...]` (or `KEY=V`, one value) as an `Axis`."""
    key, value = _key_value(text, "--grid")
    values = split_values(value)
    if any(v == "" for v in values):
        raise UserError(f"--grid {text!r}: an empty value; give KEY=[V1,V2,...]")
    if len(set(values)) != len(values):
        raise UserError(f"--grid {text!r}: a value is repeated")
    return Axis(key, tuple(values))


def parse_also(text: str) -> Overrides:
    """`--also "KEY=V KEY=V ..."` as ordered overrides (shell quoting allowed inside)."""
    items = shlex.split(text)
    if not items:
        raise UserError(f"--also {text!r}: give at least one KEY=VALUE")
    pairs = [_key_value(item, "--also") for item in items]
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise UserError(f"--also {text!r}: a key is given twice")
    return tuple(pairs)


def combinations(axes: Sequence[Axis]) -> list[Overrides]:
    """The cartesian product of the axes, the first axis varying slowest ([()] without axes)."""
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise UserError(f"--grid: key {next(k for k in keys if keys.count(k) > 1)} is given twice")
    return [tuple(zip(keys, values)) for values in itertools.product(*(a.values for a in axes))]


def apply_on_top(base: Overrides, extra: Overrides) -> Overrides:
    """`base` with `extra`'s values replacing its own (a key keeps its place), then
    `extra`'s new keys."""
    merged = dict(base)
    merged.update(extra)
    return tuple(merged.items())


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def name_part(key: str, value: str, label: str) -> str:
    """One override in a run name: `mmpo` for loss.name, `ipo` / `sigmoid_sft` for
    loss.loss_type, `beta0.1`, `normalize_none`."""
    clean = re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_") or "empty"
    if key in ("loss.name", "loss.loss_type"):
        return clean
    return f"{label}{clean}" if _number(value) else f"{label}_{clean}"


def key_labels(keys: Sequence[str]) -> dict[str, str]:
    """Each key's label in run names: its last part, or the whole key (dots as '_')
    when another key has the same last part."""
    last = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts: dict[str, int] = {}
    for k in set(keys):
        counts[last[k]] = counts.get(last[k], 0) + 1
    return {k: last[k] if counts[last[k]] == 1 else k.replace(".", "_") for k in keys}


def run_name(overrides: Overrides, labels: Mapping[str, str]) -> str:
    """The run's directory name: loss.name first, the other overrides in order."""
    ordered = sorted(overrides, key=lambda kv: kv[0] != "loss.name")  # stable
    return "-".join(name_part(k, v, labels.get(k, k)) for k, v in ordered) or "base"


def expand(axes: Sequence[Axis], also: Sequence[Overrides] = ()) -> list[RunSpec]:
    """The runs of a sweep: the grid's combinations, then per `--also` the combinations
    with its overrides on top; a run equal to an earlier one (same overrides, in any
    order) is dropped. Names must come out distinct."""
    sets = combinations(axes)
    for extra in also:
        sets += [apply_on_top(c, extra) for c in combinations(axes)]
    unique: list[Overrides] = []
    seen: set[frozenset] = set()
    for s in sets:
        if frozenset(s) not in seen:
            seen.add(frozenset(s))
            unique.append(s)
    labels = key_labels(sorted({k for s in unique for k, _ in s}))
    runs = [RunSpec(run_name(s, labels), s) for s in unique]
    names = [r.name for r in runs]
    for name in names:
        if names.count(name) > 1:
            same = [" ".join(r.override_list()) for r in runs if r.name == name]
            raise UserError(f"two runs get the name {name!r} ({' | '.join(same)}); write the values alike "
                            "(e.g. 0.1 and 0.10 are the same number)")
    return runs


def series_name(spec: RunSpec) -> str:
    """The run's name without its beta: the runs that one line of the plots joins."""
    rest = tuple((k, v) for k, v in spec.overrides if k != "loss.beta")
    labels = key_labels([k for k, _ in rest])
    return run_name(rest, labels) if rest else "runs"


# --------------------------------------------------------------------------- #
# Files of a run
# --------------------------------------------------------------------------- #
def checkpoint_complete(run_dir: Path, step: int) -> bool:
    """Whether `run_dir/checkpoints/<step>` is a complete checkpoint."""
    from mmpo_jax.train.checkpoint import CHECKPOINTS_DIR, incomplete_reason

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
    import dataclasses

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
class Outcome:
    """What became of one run: `status` ok / failed: ..., its eval record (ok runs)."""

    spec: RunSpec
    status: str
    record: dict[str, Any] | None = None
    action: str = ""  # trained / evaluated / skipped / failed


@dataclass
class SweepSettings:
    """config: the base YAML (None: defaults); overrides: the sweep's own key=value;
    out: the sweep directory; eval_options: an `EvalOptions` (the eval flags)."""

    config: str | None
    overrides: list[str]
    out: Path
    eval_options: EvalOptions
    log: Callable[[str], None] = field(default=lambda text: print(text, flush=True))


def run_config(settings: SweepSettings, spec: RunSpec) -> Any:
    """The resolved config of one run (a ConfigError for bad overrides)."""
    from mmpo_jax.config import load_config

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
    from mmpo_jax.config import config_to_yaml
    from mmpo_jax.eval.run import evaluate_trainer
    from mmpo_jax.train.run_config import config_differences

    cfg = run_config(settings, spec)
    run_dir = settings.out / spec.name
    options = settings.eval_options
    eval_settings = options.settings()
    data = None
    if cfg.train.max_steps is None:  # train.num_epochs: its length in steps needs the kept pairs
        from mmpo_jax.train.loop import load_data
        from mmpo_jax.train.run_config import with_run_length

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
            from mmpo_jax.train.loop import restore_run

            say("evaluating (training finished earlier) ...")
            trainer, _ = restore_run(run_dir)
            action = "evaluated"
        else:
            from mmpo_jax.train.loop import load_data, train
            from mmpo_jax.train.setup import build_trainer

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
    import dataclasses

    return dataclasses.replace(options, **changes)


def one_line(err: BaseException) -> str:
    """An error as one line for the summary: its type (unless a user error) and message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"


def run_sweep(settings: SweepSettings, runs: Sequence[RunSpec]) -> list[Outcome]:
    """Every run in order (see `run_one`); a failed run is recorded and the others go on.
    The summary and plots are written at the end (also after a Ctrl-C, for the runs done)."""
    from mmpo_jax.sweep_report import write_outputs

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
