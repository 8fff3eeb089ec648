"""The run: data, trainer, resume, steps, eval, metrics, checkpoints.

`train(cfg)` is what `mmpo-jax train` runs. The data position is the step: global
batch `k` is a pure function of (seed, k), so a run resumed from the checkpoint of
step `k` continues with batch `k` and reproduces, step for step, the run that never
stopped. Step numbers in `metrics.jsonl` count applied updates (the first train
record is step 1; the eval before training is step 0).

A step whose loss or gradient is not finite leaves the state unchanged (the step
decides that on device); the loop then stops with `NonFiniteStep`, naming the step
and the last good checkpoint, and writes neither its metrics nor a checkpoint.
SIGINT (Ctrl-C) finishes the step in flight, saves a checkpoint and returns.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mmpo_jax.config import RunConfig, config_to_yaml
from mmpo_jax.errors import UserError
from mmpo_jax.train.checkpoint import Checkpointer
from mmpo_jax.train.metrics import MetricsWriter, Progress, Throughput
from mmpo_jax.train.setup import Trainer, build_trainer, check_vocab, device_batch

INTERRUPTED_EXIT = 130


class NonFiniteStep(UserError):
    """A step's loss or gradient was not finite; the run stopped without applying it."""


@dataclass
class RunData:
    """The tokenized splits and, with `model.reference=precomputed`, their reference tables."""

    tokenizer: Any
    train: Any
    test: Any | None
    train_ref: np.ndarray | None = None
    test_ref: np.ndarray | None = None


@dataclass
class RunResult:
    """What a run did (`status`: finished, interrupted)."""

    status: str
    step: int
    last_checkpoint: int | None
    eval: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def load_data(cfg: RunConfig) -> RunData:
    from mmpo_jax.data.pipeline import load_preference_data
    from mmpo_jax.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train = load_preference_data(cfg.data, "train", tokenizer)
    test = load_preference_data(cfg.data, "test", tokenizer)
    return RunData(tokenizer=tokenizer, train=train, test=test)


def attach_reference_tables(cfg: RunConfig, trainer: Trainer, data: RunData, log: Callable[[str], None],
                            splits: tuple[str, ...] = ("train", "test")) -> None:
    """Mode `precomputed`: the reference pass over `splits` (cached), then the reference
    weights are released (an evaluation asks for the test split only)."""
    if cfg.model.reference != "precomputed":
        return
    from mmpo_jax.train.reference_cache import reference_table

    model = trainer.precompute_model
    if "train" in splits:
        data.train_ref = reference_table(cfg, model, data.train, "train", trainer.mesh, log)
    if "test" in splits and data.test is not None:
        data.test_ref = reference_table(cfg, model, data.test, "test", trainer.mesh, log)
    trainer.precompute_model = None


def abstract_state(state: Any) -> Any:
    """The state's shapes, dtypes and shardings: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def evaluate(trainer: Trainer, state: Any, data: Any, ref_table: np.ndarray | None,
             max_batches: int = 0) -> dict[str, float]:
    """The eval step's metrics over the test data, averaged over real pairs (each
    batch's metrics weighted by its number of real pairs)."""
    from mmpo_jax.data.pipeline import eval_batches

    batches = eval_batches(data, trainer.cfg.data.batch_size)
    n = len(batches) if max_batches <= 0 else min(max_batches, len(batches))
    totals: dict[str, float] = {}
    weight = 0.0
    for b in range(n):
        host = batches[b]
        # every process's slice of the global batch: the real pairs of the whole batch
        rows = min((b + 1) * trainer.cfg.data.batch_size, len(data)) - b * trainer.cfg.data.batch_size
        metrics = jax.device_get(trainer.eval_step(state, device_batch(host, trainer.mesh, ref_table)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * rows
        weight += rows
    return {k: v / weight for k, v in totals.items()}


def _tokens(batch: Any) -> int:
    """Real (non-padding) tokens of the global batch, from this process's share."""
    return int(np.asarray(batch.attention_mask).sum()) * jax.process_count()


class _Interrupt:
    """SIGINT sets a flag the loop reads between steps (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_Interrupt":
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def stop_now(self) -> bool:
        """Whether the run stops after this step. In a multi-process run every process
        must stop at the same step (the checkpoint save is collective: a process that
        stops alone leaves the others waiting in it), so a Ctrl-C on any process stops
        them all; the flag travels with one small all-gather per step."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def train(cfg: RunConfig, *, log: Callable[[str], None] | None = None,
          trainer: Trainer | None = None, data: RunData | None = None) -> RunResult:
    """Runs (or resumes) `cfg` to `train.max_steps`; see the module docstring."""
    start_time = time.time()
    lead = jax.process_index() == 0
    out = Path(cfg.train.output_dir)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda text: print(text, flush=True) if lead else None)
    config_yaml = config_to_yaml(cfg)
    from mmpo_jax.distributed import check_same_run

    check_same_run(config_yaml)
    if lead:
        (out / "config.yaml").write_text(config_yaml)

    data = load_data(cfg) if data is None else data
    trainer = build_trainer(cfg) if trainer is None else trainer
    check_vocab(data.tokenizer, trainer.arch, cfg)
    attach_reference_tables(cfg, trainer, data, say)

    tc = cfg.train
    with Checkpointer(out, keep=tc.keep_checkpoints) as ckpt, _Interrupt() as interrupt:
        state = trainer.state
        start = ckpt.latest_step() or 0
        if start:
            state, saved_yaml = ckpt.restore(start, abstract_state(state))
            _warn_config_changes(saved_yaml, config_yaml, say)
            say(f"resuming from {out / 'checkpoints' / str(start)} (step {start} of {tc.max_steps})")
        last_ckpt = start or None
        if start >= tc.max_steps:
            say(f"{out} already holds a finished run ({start} of train.max_steps={tc.max_steps} steps); "
                "raise train.max_steps to continue it, or choose another train.output_dir")
            trainer.state = state  # the caller's trainer holds the finished run, not its initial weights
            return RunResult("finished", start, start, {}, time.time() - start_time)
        with MetricsWriter(out, resume_step=start, enabled=lead) as writer:
            eval_metrics: dict[str, float] = {}
            if data.test is not None and start == 0:
                eval_metrics = evaluate(trainer, state, data.test, data.test_ref, tc.eval_batches)
                writer.write(0, eval_metrics, prefix="eval/")
                say(_eval_line(0, eval_metrics))
            state, result = _steps(trainer, state, data, ckpt, writer, interrupt, start, config_yaml, say)
            last_ckpt = result.last_checkpoint or last_ckpt
            step = result.step
            if result.status == "finished":
                if data.test is not None and (tc.eval_every <= 0 or step % tc.eval_every != 0):
                    eval_metrics = evaluate(trainer, state, data.test, data.test_ref, tc.eval_batches)
                    writer.write(step, eval_metrics, prefix="eval/")
                    say(_eval_line(step, eval_metrics))
                else:
                    eval_metrics = result.eval
            if ckpt.save(step, state, config_yaml, wait=True) or ckpt.latest_step() == step:
                last_ckpt = step
    trainer.state = state
    result.last_checkpoint = last_ckpt
    result.eval = eval_metrics
    result.seconds = time.time() - start_time
    if result.status == "interrupted":
        say(f"interrupted: checkpoint of step {step} saved in {out / 'checkpoints' / str(step)}; "
            "run the same command again to resume")
    else:
        say(f"done: {step} steps in {result.seconds:.0f} s; checkpoint {out / 'checkpoints' / str(step)}, "
            f"metrics {out / 'metrics.jsonl'}")
    return result


def _steps(trainer: Trainer, state: Any, data: RunData, ckpt: Checkpointer, writer: MetricsWriter,
           interrupt: _Interrupt, start: int, config_yaml: str, say: Callable[[str], None]) -> tuple[Any, RunResult]:
    from mmpo_jax.data.pipeline import train_batches

    cfg = trainer.cfg
    tc = cfg.train
    batches = train_batches(data.train, cfg.data.batch_size, cfg.data.seed)
    throughput = Throughput()
    last_ckpt: int | None = None
    eval_metrics: dict[str, float] = {}
    step = start
    with Progress(tc.max_steps, start_step=start, enabled=jax.process_index() == 0) as progress:
        while step < tc.max_steps:
            host = batches[step]
            state, metrics = trainer.train_step(state, device_batch(host, trainer.mesh, data.train_ref))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if metrics.pop("nonfinite"):
                where = (f"the last good checkpoint is {Path(tc.output_dir) / 'checkpoints' / str(last_ckpt or ckpt.latest_step())}"
                         if (last_ckpt or ckpt.latest_step()) else "no checkpoint was saved yet")
                raise NonFiniteStep(
                    f"step {step + 1}: the loss or a gradient is not finite (loss={metrics['loss']}); "
                    f"the update was not applied and nothing of this step was written; {where}. "
                    "Lower optim.learning_rate or check the data of this step "
                    f"(`mmpo-jax inspect-data`, global batch {step})"
                )
            step += 1
            rate = throughput.mark(_tokens(host))
            metrics["tokens_per_second"] = rate if rate is not None else float("nan")
            if step % tc.log_every == 0 or step == tc.max_steps:
                writer.write(step, metrics)
            progress.update(step, metrics, rate)
            if tc.eval_every > 0 and step % tc.eval_every == 0 and data.test is not None:
                progress.pause()
                eval_metrics = evaluate(trainer, state, data.test, data.test_ref, tc.eval_batches)
                writer.write(step, eval_metrics, prefix="eval/")
                progress.message(_eval_line(step, eval_metrics))
                throughput.reset()
            if tc.save_every > 0 and step % tc.save_every == 0 and step < tc.max_steps:
                progress.pause()
                if ckpt.save(step, state, config_yaml):
                    last_ckpt = step
                throughput.reset()
            if interrupt.stop_now():
                return state, RunResult("interrupted", step, last_ckpt, eval_metrics)
    return state, RunResult("finished", step, last_ckpt, eval_metrics)


def _eval_line(step: int, m: dict[str, float]) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    return f"eval @ step {step}: " + ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m)


def config_differences(saved_yaml: str, current_yaml: str, ignore: Sequence[str] = ()) -> list[str]:
    """`key (old -> new)` for each config key (dotted) that differs, `ignore`d keys aside."""
    import yaml

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(yaml.safe_load(saved_yaml) or {}), flat(yaml.safe_load(current_yaml) or {})
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys]


def _warn_config_changes(saved: str, current: str, say: Callable[[str], None]) -> None:
    changed = config_differences(saved, current)
    if changed:
        say("warning: the config differs from the checkpoint's in " + ", ".join(changed))


def restore_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Trainer, int]:
    """A finished or running run's trainer with the state of its latest checkpoint.

    The config is the run's own (`RUN_DIR/config.yaml`) with `overrides` applied.
    """
    from mmpo_jax.config import load_config

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); give the train.output_dir of a run")
    cfg = load_config(config_file, list(overrides) + [f"train.output_dir={run_dir}"])
    trainer = build_trainer(cfg)
    with Checkpointer(run_dir, keep=cfg.train.keep_checkpoints, read_only=True) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"{run_dir} has no complete checkpoint yet (in {run_dir / 'checkpoints'})")
        trainer.state, _ = ckpt.restore(step, abstract_state(trainer.state))
    return trainer, step
