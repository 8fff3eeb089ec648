"""The run: data, trainer, resume, steps, eval, metrics, checkpoints.

`train(cfg)` is what `mmpo-jax train` runs. The data position is the step: global
batch `k` is a pure function of (seed, k), so a run resumed from the checkpoint of
step `k` continues with batch `k` and reproduces, step for step, the run that never
stopped. Step numbers in `metrics.jsonl` count applied updates (the first train
record is step 1; the eval before training is step 0).

A step whose loss, gradient or updated weights are not finite leaves the state unchanged (the step
decides that on device); the loop then stops with `NonFiniteStep`, naming the step
and the last checkpoint (good when its checksums verify it), and writes neither its
metrics nor a checkpoint. SIGINT (Ctrl-C), SIGTERM (preemption) and SIGHUP (the terminal
closed) finish the step in flight, save a checkpoint and return (every process of a
multi-process run at the same step).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np

from mmpo_jax import storage
from mmpo_jax.config import applicable_dict, config_to_yaml
from mmpo_jax.config_schema import RunConfig
from mmpo_jax.errors import UserError
from mmpo_jax.eval.preference import evaluate
from mmpo_jax.files import write_text_atomic
from mmpo_jax.storage import Location
from mmpo_jax.train.checkpoint import (
    CHECKPOINTS_DIR,
    INCOMPLETE_DIR,
    Checkpointer,
    check_checkpoints_dir,
    saved_config_text,
    step_dirs,
)
from mmpo_jax.train.metrics import MetricsWriter, Progress, Throughput
from mmpo_jax.train.trackers import TrackerSet, check_installed, make_trackers, report_to
from mmpo_jax.train.preflight import check_batch_fits, check_paths
from mmpo_jax.train.report import Stages, count_text, end_summary
from mmpo_jax.train.run_files import METRICS_FILE
from mmpo_jax.train.run_lock import RunLock
from mmpo_jax.train.run_config import (
    check_resume_config,
    config_differences,
    record_config_change,
    schedule_change_lines,
    with_run_length,
)
from mmpo_jax.train.run_mirror import RunFiles
from mmpo_jax.train.run_restore import restore_run, saved_run_config  # noqa: F401 (the commands' entry points)
from mmpo_jax.train.setup import (
    Trainer,
    build_trainer,
    check_vocab,
    device_batch,
    initial_reference,
)

if TYPE_CHECKING:
    from mmpo_jax.data.batches import PreferenceBatch
    from mmpo_jax.data.packing import PackedBatch
    from mmpo_jax.data.pipeline import PreferenceData
    from mmpo_jax.train.state import TrainState


class NonFiniteStep(UserError):
    """A step's loss, gradient or update was not finite; the run stopped without applying it."""


@dataclass
class RunData:
    """The tokenized splits and, with `model.reference=precomputed`, their reference tables."""

    tokenizer: Any
    train: PreferenceData
    test: PreferenceData | None
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
    # an interrupted run's process exit status: 130 after SIGINT, 143 after SIGTERM, 129 after SIGHUP
    exit_status: int = 0


def load_data(cfg: RunConfig, log: Callable[[str], None] | None = None) -> RunData:
    """The tokenizer and both splits; `log` hears each stage (tokenizing or the cache)."""
    from mmpo_jax.data.pipeline import load_preference_data
    from mmpo_jax.data.tokenizers import tokenizer_of

    tokenizer = tokenizer_of(cfg.data, cfg.model.path)
    train = load_preference_data(cfg.data, "train", tokenizer, log=log)
    assert train is not None  # a train split without sources is refused (data.sources.source_specs)
    test = load_preference_data(cfg.data, "test", tokenizer, log=log)
    return RunData(tokenizer=tokenizer, train=train, test=test)


def attach_reference_tables(cfg: RunConfig, trainer: Trainer, data: RunData, log: Callable[[str], None],
                            splits: tuple[str, ...] = ("train", "test")) -> None:
    """Mode `precomputed`: the reference tables of `splits` (an evaluation asks for the
    test split only), from the cache or one pass of the initial reference, loaded for it."""
    from mmpo_jax.train.reference import reference_mode
    from mmpo_jax.train.reference_cache import reference_table

    if not reference_mode(cfg.model.reference).precomputed:
        return

    # cached: a pass over both splits loads the model once
    load = functools.cache(functools.partial(initial_reference, trainer))
    if "train" in splits:
        data.train_ref = reference_table(cfg, load, data.train, "train", trainer.mesh, log)
    if "test" in splits and data.test is not None:
        data.test_ref = reference_table(cfg, load, data.test, "test", trainer.mesh, log)


def abstract_state(state: Any) -> Any:
    """The state's shapes, dtypes and shardings: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _tokens(batch: PreferenceBatch | PackedBatch) -> int:
    """Real tokens (`batches.real_tokens`) of the global batch, from this process's share."""
    from mmpo_jax.data.batches import real_tokens

    return real_tokens(batch) * jax.process_count()


class SecondSignal(KeyboardInterrupt):
    """The second SIGINT, SIGTERM or SIGHUP of a run: it stops at once, the process exiting
    with `exit_status` (128 + the signal, as a shell reports a process the signal ended)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_status = 128 + signum


class _Interrupt:
    """SIGINT (Ctrl-C), SIGTERM (a preemption notice: a Spot VM's shutdown, SLURM's
    or Kubernetes' stop) and SIGHUP (the terminal closed) set a flag the loop reads between
    steps; a second signal of the same kind aborts at once (`SecondSignal`). In a
    multi-process run, SIGTERM is left to JAX's preemption service (`jax.distributed.initialize`
    starts it and it takes SIGTERM as its notice: a Python handler would take the signal from
    it), which the loop asks at every step."""

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal that asked for the stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupt":
        def handler(signum: int, frame: Any) -> None:
            if self.requested == signum:
                raise SecondSignal(signum)
            if signum == signal.SIGHUP:
                _leave_the_terminal()
            self.requested = signum

        signals = [signal.SIGINT, signal.SIGHUP] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: no handler, signals behave as usual
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def stop_now(self, step: int) -> bool:
        """Whether the run stops after `step`. In a multi-process run every process
        must stop at the same step (the checkpoint save is collective: a process that
        stops alone leaves the others waiting in it), so a Ctrl-C on any process stops
        them all (the flag travels with one small all-gather per step), and a SIGTERM
        to any of them stops all at the step the preemption service agrees on."""
        if jax.process_count() == 1:
            return self.requested is not None
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.requested = int(signal.SIGTERM)
        local = np.int32(self.requested in (signal.SIGINT, signal.SIGHUP))
        return bool(np.any(multihost_utils.process_allgather(local))) or self.requested is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended."""
        return 128 + int(self.requested or signal.SIGINT)


def _leave_the_terminal() -> None:
    """Points stdout and stderr at /dev/null where they are a terminal (a character device):
    after SIGHUP it is gone, and a write to it would fail (EIO) before the checkpoint is saved.
    Pipes and files (nohup, tee, a log) keep the run's last lines."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def train(cfg: RunConfig, *, log: Callable[[str], None] | None = None,
          trainer: Trainer | None = None, data: RunData | None = None,
          allow_config_change: bool = False) -> RunResult:
    """Runs (or resumes) `cfg` to `train.max_steps`; see the module docstring.

    Nothing in `train.output_dir` changes before every check has passed and the run
    really starts (its state loaded or restored): a start that fails leaves a previous
    run's `config.yaml` and files as they were. A resume that would change the
    objective or the data (`RESUME_SAFE_KEYS` are the others) is refused unless
    `allow_config_change`, and then recorded in `config_changes.jsonl`.
    """
    start_time = time.time()
    lead = jax.process_index() == 0
    storage.set_timeout(cfg.train.storage_timeout_s)
    out = storage.absolute(cfg.train.output_dir)
    files = RunFiles(out)
    say = log or (lambda text: print(text, flush=True) if lead else None)
    stages = Stages(say)
    paths_checked = False
    if cfg.train.max_steps is None:  # train.num_epochs: the length is known once the data is
        assert trainer is None, "build a trainer from the with_run_length config: its schedule needs the length"
        check_paths(cfg)
        paths_checked = True
        data = _load_stage(cfg, stages, say) if data is None else data
        cfg, line = with_run_length(cfg, len(data.train))
        say(line or "")
    config_yaml = config_to_yaml(cfg)
    from mmpo_jax.distributed import check_same_run

    check_same_run(config_yaml)
    tc = cfg.train
    check_installed(report_to(tc.report_to))
    check_checkpoints_dir(out)
    done = latest_complete_step(out)
    if trainer is None and done is not None and done >= tc.steps:
        # a finished run is known from its checkpoint directory: no model to load for that, but
        # its config must be this one (else `train X && export` would ship another run's model)
        check_resume_config(saved_config_text(storage.join(out, CHECKPOINTS_DIR, str(done))), config_yaml,
                            allow_config_change, finished=True)
        _say_finished(out, done, tc.steps, say)
        return RunResult("finished", done, done, {}, time.time() - start_time)
    with contextlib.ExitStack() as held:
        lock: RunLock | None = None
        if lead and files.local.is_dir():  # a run directory in use: refused before anything is loaded
            lock = held.enter_context(RunLock(files.local, say))
        if done is not None:
            check_resume_config(saved_config_text(storage.join(out, CHECKPOINTS_DIR, str(done))), config_yaml,
                                allow_config_change, finished=done >= tc.steps)
        if (data is None or trainer is None) and not paths_checked:
            check_paths(cfg)  # (a hub id is resolved here: once is enough)
        if data is None:
            data = _load_stage(cfg, stages, say)
        check_batch_fits(data.train, cfg.data.batch_size)
        if trainer is None:
            stages.start(f"loading the model {cfg.model.path or '(random init of model.init)'}")
            trainer = build_trainer(cfg)
            stages.end(_model_text(trainer))
        check_vocab(data.tokenizer, trainer.arch, cfg)
        attach_reference_tables(cfg, trainer, data, say)
        if lead and lock is None:
            files.local.mkdir(parents=True, exist_ok=True)
            lock = held.enter_context(RunLock(files.local, say))
        result = _run(trainer, data, config_yaml, stages, say, lock, files)
    result.seconds = time.time() - start_time
    if result.status == "interrupted":
        why = {128 + signal.SIGTERM: "stopped by SIGTERM (a preemption notice)",
               128 + signal.SIGHUP: "stopped by SIGHUP (the terminal closed)"}.get(result.exit_status, "interrupted")
        say(f"{why}: checkpoint of step {result.step} saved in {storage.join(out, CHECKPOINTS_DIR, str(result.step))}; "
            "run the same command again to resume")
    elif result.status == "finished" and result.step > (done or 0):
        say(f"done: {result.step} steps in {result.seconds:.0f} s; checkpoint "
            f"{storage.join(out, CHECKPOINTS_DIR, str(result.step))}, metrics {storage.join(out, METRICS_FILE)}")
        if lead:
            for line in end_summary(out, files.local, lora=trainer.options.lora is not None,
                                    has_test=data.test is not None):
                say(line)
    return result


def _load_stage(cfg: RunConfig, stages: Stages, say: Callable[[str], None]) -> RunData:
    stages.start(f"loading the tokenizer {cfg.data.tokenizer} and the data")
    data = load_data(cfg, log=say)
    stages.end(f"data: {len(data.train)} train pairs" + (f", {len(data.test)} test pairs" if data.test else ""))
    return data


def _run(trainer: Trainer, data: RunData, config_yaml: str, stages: Stages,
         say: Callable[[str], None], lock: RunLock | None, files: RunFiles) -> RunResult:
    """The run once everything is loaded: restore, the evals, the steps, the final save
    (`lock`: the output directory's, held by process 0; `files`: where its files go)."""
    cfg, tc = trainer.cfg, trainer.cfg.train
    out, local = files.location, files.local
    lead = jax.process_index() == 0
    # periodic saves in the background (the arrays copied to host memory first): the steps
    # go on while the files are written; the final and the interrupted save wait for theirs
    with Checkpointer(out, keep=tc.keep_checkpoints, async_save=True) as ckpt, _Interrupt() as interrupt:
        restored = ckpt.restore_latest(abstract_state(trainer.state))
        state, start = (restored.state, restored.step) if restored else (trainer.state, 0)
        if not start and ckpt.moved_corrupt:
            raise UserError(
                f"every checkpoint of {out} was corrupt and is moved to {storage.join(out, INCOMPLETE_DIR)} "
                f"({', '.join(storage.name(p) for p in ckpt.moved_corrupt)}; the warnings above say which file): "
                "nothing is left to resume from. Run the same command again to start over from step 0."
            )
        changes: list[str] = []
        if restored:
            changes = config_differences(restored.config_yaml, config_yaml)
            if changes:
                say("warning: the config differs from the checkpoint's in " + ", ".join(changes))
                for line in schedule_change_lines(restored.config_yaml, cfg, start):
                    say("warning: " + line)
            say(f"resuming from {storage.join(out, CHECKPOINTS_DIR, str(start))} (step {start} of {tc.steps})")
        if start >= tc.steps:
            _say_finished(out, start, tc.steps, say)
            trainer.state = state  # the caller's trainer holds the finished run, not its initial weights
            return RunResult("finished", start, start)
        if lock is not None:
            lock.claim()
            files.pull(say)  # a bucket's log files, then this start's record among them
            if changes:
                record_config_change(local, start, changes)
            write_text_atomic(local / "config.yaml", config_yaml)
        trackers = _trackers(cfg, local, changes, start, say) if lead else None
        tags: dict[str, str] = {}
        try:
            with MetricsWriter(local, resume_step=start, enabled=lead, trackers=trackers,
                               tensorboard="tensorboard" in report_to(tc.report_to)) as writer:
                eval_metrics: dict[str, float] = {}
                if data.test is not None and start == 0:
                    eval_metrics = _timed_eval(trainer, state, data, 0, writer, stages)
                say(f"training steps {start + 1}-{tc.steps}, {cfg.data.batch_size} pairs each "
                    "(the first step compiles the train step)")
                state, result = _steps(trainer, state, data, ckpt, writer, interrupt, start, config_yaml, say,
                                       files.push if lead else lambda: None)
                last_ckpt = result.last_checkpoint or start or None
                step = result.step
                if result.status == "finished":
                    if data.test is not None and (tc.eval_every <= 0 or step % tc.eval_every != 0):
                        eval_metrics = _timed_eval(trainer, state, data, step, writer, stages)
                    else:
                        eval_metrics = result.eval
                stages.start(f"saving the checkpoint of step {step}")
                if ckpt.save(step, state, config_yaml, wait=True) or ckpt.latest_step() == step:
                    last_ckpt = step
                stages.end(f"saved {storage.join(out, CHECKPOINTS_DIR, str(step))}")
                if last_ckpt:
                    tags["checkpoint"] = str(storage.join(out, CHECKPOINTS_DIR, str(last_ckpt)))
        finally:
            if trackers is not None:
                trackers.close(tags)
            if lead:
                files.push()
    trainer.state = state
    result.last_checkpoint = last_ckpt
    result.eval = eval_metrics
    return result


def latest_complete_step(output_dir: Location) -> int | None:
    """The newest complete, uncorrupted checkpoint step of a run directory, read from its files only."""
    from mmpo_jax.train.checkpoint import corruption_reason, incomplete_reason

    root = storage.join(output_dir, CHECKPOINTS_DIR)
    for step in step_dirs(root):
        step_dir = storage.join(root, str(step))
        if incomplete_reason(step_dir) is None and corruption_reason(step_dir) is None:
            return step
    return None


def _say_finished(out: Location, step: int, max_steps: int, say: Callable[[str], None]) -> None:
    say(f"{out} already holds a finished run ({step} of train.max_steps={max_steps} steps); "
        "raise train.max_steps to continue it, or choose another train.output_dir")


def _model_text(trainer: Trainer) -> str:
    trainable = sum(x.size for x in jax.tree.leaves(trainer.state.trainable))
    total = trainable + sum(x.size for x in jax.tree.leaves(trainer.state.frozen))
    lora = trainer.options.lora
    how = f"LoRA rank {lora.rank}" if lora is not None else "full fine-tuning"
    devices = trainer.mesh.devices.size
    return (f"model: {count_text(total)} parameters, {count_text(trainable)} trained ({how}), "
            f"reference {trainer.cfg.model.reference}, on {devices} {jax.default_backend()} "
            f"device{'s' if devices > 1 else ''}")


def _timed_eval(trainer: Trainer, state: TrainState, data: RunData, step: int, writer: MetricsWriter,
                stages: Stages) -> dict[str, float]:
    """The eval at `step`, written and printed with its time (the first compiles the eval step)."""
    assert data.test is not None, "an eval needs test data"
    n = _eval_pairs(len(data.test), trainer.cfg.data.batch_size, trainer.cfg.train.eval_batches)
    stages.start(f"evaluating {n} test pairs at step {step}" + (" (the first batch compiles the eval step)" if step == 0 else ""))
    metrics = evaluate(trainer, state, data.test, data.test_ref, trainer.cfg.train.eval_batches)
    writer.write(step, metrics, prefix="eval/")
    stages.end(_eval_line(step, metrics))
    return metrics


def _eval_pairs(rows: int, batch_size: int, max_batches: int) -> int:
    return rows if max_batches <= 0 else min(rows, max_batches * batch_size)


def _steps(trainer: Trainer, state: TrainState, data: RunData, ckpt: Checkpointer, writer: MetricsWriter,
           interrupt: _Interrupt, start: int, config_yaml: str, say: Callable[[str], None],
           push: Callable[[], None]) -> tuple[TrainState, RunResult]:
    """The train steps from `start`, with their logs, evals and periodic saves (`push`:
    copies the run's log files to a bucket output dir after each save)."""
    from mmpo_jax.data.batches import train_batches
    from mmpo_jax.data.prefetch import BatchTimes, prefetched

    cfg = trainer.cfg
    tc = cfg.train
    times = BatchTimes()
    # the next batches are built on a thread while the device runs the step
    feed = prefetched(train_batches(data.train, cfg.data.batch_size, cfg.data.seed, times=times,
                                    packing=trainer.packing), start, times)
    throughput = Throughput()
    last_ckpt: int | None = None
    eval_metrics: dict[str, float] = {}
    step = start
    with Progress(tc.steps, start_step=start, enabled=jax.process_index() == 0) as progress:
        while step < tc.steps:
            host = next(feed)
            state, metrics = trainer.train_step(state, device_batch(host, trainer.mesh, data.train_ref))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if metrics.pop("nonfinite"):
                ckpt.wait()  # name only a checkpoint that is complete on disk
                raise NonFiniteStep(
                    f"step {step + 1}: the loss, a gradient or an updated weight is not finite "
                    f"(loss={metrics['loss']}, grad_norm={metrics.get('grad_norm')}); "
                    f"the update was not applied and nothing of this step was written; {_last_checkpoint(ckpt, tc)}. "
                    "Lower optim.learning_rate or check the data of this step "
                    f"(`mmpo-jax inspect-data`, global batch {step})"
                )
            step += 1
            rate = throughput.mark(_tokens(host))
            metrics["tokens_per_second"] = rate if rate is not None else float("nan")
            if step % tc.log_every == 0 or step == tc.steps:
                writer.write(step, metrics)
            progress.update(step, metrics, rate)
            if tc.eval_every > 0 and step % tc.eval_every == 0 and data.test is not None:
                progress.pause()
                eval_metrics = evaluate(trainer, state, data.test, data.test_ref, tc.eval_batches)
                writer.write(step, eval_metrics, prefix="eval/")
                progress.message(_eval_line(step, eval_metrics))
                throughput.reset()
            if tc.save_every > 0 and step % tc.save_every == 0 and step < tc.steps:
                progress.pause()
                if ckpt.save(step, state, config_yaml):
                    last_ckpt = step
                push()
                throughput.reset()
            if interrupt.stop_now(step):
                progress.message(times.summary())
                return state, RunResult("interrupted", step, last_ckpt, eval_metrics,
                                        exit_status=interrupt.exit_status)
    if step > start:
        say(times.summary())
    return state, RunResult("finished", step, last_ckpt, eval_metrics)


def _last_checkpoint(ckpt: Checkpointer, tc: Any) -> str:
    """The non-finite stop's words for the newest checkpoint: good only when checksums verify it."""
    step = ckpt.latest_step()
    if step is None:
        return "no checkpoint was saved yet"
    where = storage.join(tc.output_dir, CHECKPOINTS_DIR, str(step))
    if ckpt.is_verified(step):
        return f"the last good checkpoint is {where}"
    return (f"the last checkpoint, {where}, has no checksums (saved before they existed), so it may be damaged "
            "although its arrays were finite: if this step fails on every rerun, move it aside to resume "
            "from the one before")


def _eval_line(step: int, m: dict[str, float]) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    return f"eval @ step {step}: " + ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m)


def _trackers(cfg: RunConfig, out: Path, changes: list[str], start: int, say: Callable[[str], None]
              ) -> TrackerSet | None:
    """The run's MLflow / W&B trackers (None when `train.report_to` names neither)."""
    names = [n for n in report_to(cfg.train.report_to) if n != "tensorboard"]
    if not names:
        return None
    return make_trackers(names, out, run_name=cfg.train.run_name, mlflow_tracking_uri=cfg.train.mlflow_tracking_uri,
                         config=applicable_dict(cfg), changes=changes, resume_step=start, say=say)


def names_a_run(target: str) -> bool:
    """Whether a CONFIG|RUN_DIR argument names a run: a local directory, or a gs:// URL
    (a config is a local file)."""
    return storage.is_url(target) or Path(target).is_dir()
