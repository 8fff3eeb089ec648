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
multi-process run at the same step: `run_signals`). Reading run directories and the
resume policy are `run_restore` and `run_config`; the data, `run_data`.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jax

from mmpo_jax import storage
from mmpo_jax.config import applicable_dict, config_to_yaml
from mmpo_jax.config_schema import RunConfig
from mmpo_jax.data.batches import real_tokens, train_batches
from mmpo_jax.data.layout import device_batch
from mmpo_jax.data.prefetch import BatchTimes, prefetched
from mmpo_jax.distributed import check_same_run
from mmpo_jax.errors import UserError
from mmpo_jax.files import write_text_atomic
from mmpo_jax.train.checkpoint import CHECKPOINTS_DIR, Checkpointer, check_checkpoints_dir
from mmpo_jax.train.metrics import MetricsWriter, Progress, Throughput
from mmpo_jax.train.preference_eval import eval_line, evaluate, timed_eval
from mmpo_jax.train.preflight import check_batch_fits, check_paths
from mmpo_jax.train.report import Stages, count_text, end_summary
from mmpo_jax.train.run_config import check_saved_config, finished_line, record_config_change, with_run_length
from mmpo_jax.train.run_data import RunData, attach_reference_tables, load_stage
from mmpo_jax.train.run_files import METRICS_FILE
from mmpo_jax.train.run_lock import RunLock
from mmpo_jax.train.run_mirror import RunFiles
from mmpo_jax.train.run_restore import latest_complete_step, resume_from
from mmpo_jax.train.run_signals import Interrupt
from mmpo_jax.train.setup import Trainer, build_trainer, check_vocab
from mmpo_jax.train.trackers import TrackerSet, check_installed, make_trackers, report_to

if TYPE_CHECKING:
    from mmpo_jax.train.state import TrainState


class NonFiniteStep(UserError):
    """A step's loss, gradient or update was not finite; the run stopped without applying it."""


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
        data = load_stage(cfg, stages, say) if data is None else data
        cfg, line = with_run_length(cfg, len(data.train))
        say(line or "")
    config_yaml = config_to_yaml(cfg)
    check_same_run(config_yaml)
    tc = cfg.train
    check_installed(report_to(tc.report_to))
    check_checkpoints_dir(out)
    done = latest_complete_step(out)
    if trainer is None and done is not None and done >= tc.steps:
        # a finished run is known from its checkpoint directory: no model to load for that, but
        # its config must be this one (else `train X && export` would ship another run's model)
        check_saved_config(out, done, config_yaml, allow_config_change, finished=True)
        say(finished_line(out, done, tc.steps))
        return RunResult("finished", done, done, {}, time.time() - start_time)
    with contextlib.ExitStack() as held:
        lock: RunLock | None = None
        if lead and files.local.is_dir():  # a run directory in use: refused before anything is loaded
            lock = held.enter_context(RunLock(files.local, say))
        if done is not None:
            check_saved_config(out, done, config_yaml, allow_config_change, finished=done >= tc.steps)
        if (data is None or trainer is None) and not paths_checked:
            check_paths(cfg)  # (a hub id is resolved here: once is enough)
        if data is None:
            data = load_stage(cfg, stages, say)
        check_batch_fits(data.train, cfg.data.batch_size)
        if trainer is None:
            stages.start(f"loading the model {cfg.model.path or '(random init of model.init)'}")
            trainer = build_trainer(cfg, say=say)
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


def _run(trainer: Trainer, data: RunData, config_yaml: str, stages: Stages,
         say: Callable[[str], None], lock: RunLock | None, files: RunFiles) -> RunResult:
    """The run once everything is loaded: restore, the evals, the steps, the final save
    (`lock`: the output directory's, held by process 0; `files`: where its files go)."""
    cfg, tc = trainer.cfg, trainer.cfg.train
    out, local = files.location, files.local
    lead = jax.process_index() == 0
    # periodic saves in the background (the arrays copied to host memory first): the steps
    # go on while the files are written; the final and the interrupted save wait for theirs
    with Checkpointer(out, keep=tc.keep_checkpoints, async_save=True) as ckpt, Interrupt() as interrupt:
        resumed = resume_from(ckpt, trainer, config_yaml, say)
        state, start, changes = resumed.state, resumed.start, resumed.changes
        if start >= tc.steps:
            say(finished_line(out, start, tc.steps))
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
                    eval_metrics = timed_eval(trainer, state, data, 0, writer, stages)
                say(f"training steps {start + 1}-{tc.steps}, {cfg.data.batch_size} pairs each "
                    "(the first step compiles the train step)")
                state, result = _steps(trainer, state, data, ckpt, writer, interrupt, start, config_yaml, say,
                                       files.push if lead else lambda: None)
                last_ckpt = result.last_checkpoint or start or None
                step = result.step
                if result.status == "finished":
                    if data.test is not None and (tc.eval_every <= 0 or step % tc.eval_every != 0):
                        eval_metrics = timed_eval(trainer, state, data, step, writer, stages)
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


def _model_text(trainer: Trainer) -> str:
    trainable = sum(x.size for x in jax.tree.leaves(trainer.state.trainable))
    total = trainable + sum(x.size for x in jax.tree.leaves(trainer.state.frozen))
    lora = trainer.options.lora
    how = f"LoRA rank {lora.rank}" if lora is not None else "full fine-tuning"
    devices = trainer.mesh.devices.size
    return (f"model: {count_text(total)} parameters, {count_text(trainable)} trained ({how}), "
            f"reference {trainer.sdef.reference_mode.name}, on {devices} {jax.default_backend()} "
            f"device{'s' if devices > 1 else ''}")


def _steps(trainer: Trainer, state: TrainState, data: RunData, ckpt: Checkpointer, writer: MetricsWriter,
           interrupt: Interrupt, start: int, config_yaml: str, say: Callable[[str], None],
           push: Callable[[], None]) -> tuple[TrainState, RunResult]:
    """The train steps from `start`, with their logs, evals and periodic saves (`push`:
    copies the run's log files to a bucket output dir after each save)."""
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
            state, step_metrics = trainer.train_step(state, device_batch(host, trainer.mesh, data.train_ref))
            metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
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
            rate = throughput.mark(real_tokens(host) * jax.process_count())  # the global batch's, from this share
            metrics["tokens_per_second"] = rate if rate is not None else float("nan")
            if step % tc.log_every == 0 or step == tc.steps:
                writer.write(step, metrics)
            progress.update(step, metrics, rate)
            if tc.eval_every > 0 and step % tc.eval_every == 0 and data.test is not None:
                progress.pause()
                eval_metrics = evaluate(trainer, state, data.test, data.test_ref, tc.eval_batches)
                writer.write(step, eval_metrics, prefix="eval/")
                progress.message(eval_line(step, eval_metrics))
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


def _trackers(cfg: RunConfig, out: Path, changes: list[str], start: int, say: Callable[[str], None]
              ) -> TrackerSet | None:
    """The run's MLflow / W&B trackers (None when `train.report_to` names neither)."""
    names = [n for n in report_to(cfg.train.report_to) if n != "tensorboard"]
    if not names:
        return None
    return make_trackers(names, out, run_name=cfg.train.run_name, mlflow_tracking_uri=cfg.train.mlflow_tracking_uri,
                         config=applicable_dict(cfg), changes=changes, resume_step=start, say=say)
