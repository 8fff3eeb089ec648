"""Experiment trackers (`train.report_to`: MLflow, Weights & Biases) beside `metrics.jsonl`.

`metrics.jsonl` stays the source of truth: every record the run writes there (train steps,
and eval passes under their `eval/` names) is also sent to each tracker, from process 0
only. A tracker runs on its own background thread behind a bounded queue, so logging
never blocks a step (MLflow's HTTP client retries for minutes when its server is gone);
a tracker that fails is reported once and dropped, and the run goes on.

Resume. `<output_dir>/trackers.json` keeps each tracker's run id and the last record it
took (step, then train before eval). A resumed run continues the same tracker run (a W&B
run in offline mode becomes a new offline run directory with the same id, as W&B does)
and skips records at or before that one, so no step is logged twice: an exact resume
recomputes those steps to the same values. A resume that changed the config
(--allow-config-change) computes them anew: a tracker that takes a step again (MLflow: the
newest value of a step is the one shown) gets the new values; W&B refuses steps below its
last, so it keeps the first ones. MLflow params cannot change, so a resume's config changes
become tags `config_change.step<N>.<key>` ("old -> new").
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mmpo_jax.choices import TRACKERS
from mmpo_jax.errors import UserError
from mmpo_jax.files import write_text_atomic
from mmpo_jax.train.run_files import EVAL_PREFIX

STATE_FILE = "trackers.json"
# what `pip install` each tracker needs (the extras of pyproject.toml)
PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "'mmpo-jax[mlflow]'"),
            "wandb": ("wandb", "'mmpo-jax[wandb]'")}
QUEUE_SIZE = 10_000
CLOSE_TIMEOUT_S = 30.0


def report_to(value: str | Sequence[str]) -> tuple[str, ...]:
    """`train.report_to` as a tuple of tracker names (`none` -> empty)."""
    names = (value,) if isinstance(value, str) else tuple(value)
    return () if names == ("none",) else names


def check_installed(names: Sequence[str]) -> None:
    """Stops at start, with the pip command to run, when a named tracker's package is missing."""
    for name in names:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.report_to names {name}, but the {module} package is not installed: "
                            f"pip install {extra} (or leave {name} out of train.report_to)")


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as `{dotted key: value as text}` (tracker params)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


def _position(record: Mapping[str, Any]) -> tuple[int, int]:
    """A record's place in the run: its step, then train (0) before eval (1)."""
    is_eval = any(k.startswith(EVAL_PREFIX) for k in record if k != "step")
    return int(record["step"]), int(is_eval)


class Tracker:
    """One tracker's run; the subclasses talk to its package (on the worker thread)."""

    name = ""
    # whether a step logged again replaces the first values (else the tracker drops it)
    relogs_steps = False

    def start(self, run_id: str | None, params: dict[str, str], changes: Sequence[str], resume_step: int
              ) -> str:
        """Opens (or reopens, `run_id`) the tracker's run; returns its id."""
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, tags: dict[str, str]) -> None:
        raise NotImplementedError


class MlflowTracker(Tracker):
    name = "mlflow"
    relogs_steps = True

    def __init__(self, tracking_uri: str, run_name: str, experiment: str) -> None:
        # fail within seconds, not minutes, when the server is gone (unless the user set these)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow  # lazy: optional (pip install mmpo-jax[mlflow]), for train.report_to: mlflow only

        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri or None)
        self.run_name, self.experiment = run_name, experiment
        self.run_id = ""

    def start(self, run_id: str | None, params: dict[str, str], changes: Sequence[str], resume_step: int
              ) -> str:
        from mlflow.entities import Param, RunTag  # lazy: optional, as `import mlflow` above

        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            tags = [RunTag(f"config_change.step{resume_step}.{c.split(' ', 1)[0]}", c.split(" ", 1)[1][1:-1])
                    for c in changes]
            if tags:
                self.client.log_batch(run_id, tags=tags)
            return run_id
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        run = self.client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        return self.run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric  # lazy: optional, as `import mlflow` above

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, output_dir: Path, run_name: str, project: str) -> None:
        self.output_dir, self.run_name, self.project = output_dir, run_name, project
        self.run: Any = None

    def start(self, run_id: str | None, params: dict[str, str], changes: Sequence[str], resume_step: int
              ) -> str:
        import wandb  # lazy: optional (pip install mmpo-jax[wandb]), for train.report_to: wandb only

        self.run = wandb.init(project=self.project, name=self.run_name, id=run_id or None, resume="allow",
                              dir=str(self.output_dir), config=params, reinit="create_new")
        if changes:
            self.run.config.update({f"config_change.step{resume_step}.{c.split(' ', 1)[0]}": c.split(" ", 1)[1]
                                    for c in changes}, allow_val_change=True)
        return str(self.run.id)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.run.summary[key] = value
        self.run.finish()


class TrackerSet:
    """The run's trackers, each on a background thread; `send` never blocks.

    Args:
      trackers: the trackers to run (none: this object does nothing).
      output_dir: where `trackers.json` lives.
      params: the resolved config, flattened; `changes`: a resume's config changes.
      resume_step: the step the run starts from.
      say: where the one report of a failing tracker goes.
    """

    def __init__(self, trackers: Sequence[Tracker], output_dir: Path, params: dict[str, str],
                 changes: Sequence[str], resume_step: int, say: Callable[[str], None]) -> None:
        self.output_dir, self.say = output_dir, say
        self._state_path = output_dir / STATE_FILE
        self._state: dict[str, dict[str, Any]] = self._read_state()
        # what each tracker took before this start: records at or before it are not sent again,
        # unless the config changed (they come out otherwise) and the tracker takes a step again
        relogs = {t.name for t in trackers if t.relogs_steps} if changes else set()
        self._taken = {name: tuple(entry["last"]) for name, entry in self._state.items()
                       if "last" in entry and name not in relogs}
        self._lock = threading.Lock()
        self._workers = [_Worker(t, self) for t in trackers]
        for w in self._workers:
            run_id = self._state.get(w.tracker.name, {}).get("run_id")
            w.submit(partial(self._start, w, run_id, params, changes, resume_step))

    def _read_state(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self._state_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _start(self, worker: _Worker, run_id: str | None, params: dict[str, str], changes: Sequence[str],
               resume_step: int) -> None:
        run_id = worker.tracker.start(run_id, params, changes, resume_step)
        with self._lock:
            entry = self._state.setdefault(worker.tracker.name, {})
            entry["run_id"] = run_id
            self._save()

    def _log(self, worker: _Worker, position: tuple[int, int], values: dict[str, float]) -> None:
        worker.tracker.log(position[0], values)
        with self._lock:
            self._state.setdefault(worker.tracker.name, {})["last"] = list(position)
            self._save()

    def _save(self) -> None:
        write_text_atomic(self._state_path, json.dumps(self._state, indent=1) + "\n")

    def send(self, record: Mapping[str, Any]) -> None:
        """Queues one metrics.jsonl record for every tracker that has not taken it yet."""
        position = _position(record)
        values = {k: (float("nan") if v is None else float(v)) for k, v in record.items() if k != "step"}
        for w in self._workers:
            taken = self._taken.get(w.tracker.name)
            if taken is not None and position <= taken:
                continue  # logged before a resume: the recomputed step has the same values
            w.submit(partial(self._log, w, position, values))

    def close(self, tags: dict[str, str]) -> None:
        """Finishes every tracker's run (`tags` on it) and waits for the queues, at most
        CLOSE_TIMEOUT_S in all; a tracker still stuck then is abandoned (and said)."""
        for w in self._workers:
            w.submit(partial(w.tracker.finish, tags))
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for w in self._workers:
            if not w.close(max(0.0, deadline - time.monotonic())):
                self.say(f"warning: {w.tracker.name} did not finish within {CLOSE_TIMEOUT_S:.0f} s; "
                         f"its last records are missing there ({self.output_dir / 'metrics.jsonl'} has them)")


class _Worker:
    """A tracker's calls, run in order on one daemon thread. The first failure (or a full
    queue: the tracker stopped answering) is reported once; the tracker is then dropped."""

    def __init__(self, tracker: Tracker, owner: TrackerSet) -> None:
        self.tracker, self.owner = tracker, owner
        self.failed = False
        self._queue: queue.Queue[Callable[[], Any] | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread = threading.Thread(target=self._loop, name=f"tracker-{tracker.name}", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any]) -> None:
        if self.failed:
            return
        try:
            self._queue.put_nowait(call)
        except queue.Full:
            self._fail(f"stopped taking records ({QUEUE_SIZE} waiting)")

    def _loop(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            if self.failed:
                continue
            try:
                call()
            except Exception as err:  # any failure of the tracker's package: the run goes on
                self._fail(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    def _fail(self, why: str) -> None:
        if not self.failed:
            self.failed = True
            self.owner.say(f"warning: {self.tracker.name} failed ({why}); the run goes on without it, "
                           f"{self.owner.output_dir / 'metrics.jsonl'} keeps every record")

    def close(self, timeout: float) -> bool:
        try:
            self._queue.put(None, timeout=max(timeout, 0.01))
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


def make_trackers(names: Sequence[str], output_dir: Path, *, run_name: str, mlflow_tracking_uri: str,
                  config: Mapping[str, Any], changes: Sequence[str], resume_step: int,
                  say: Callable[[str], None]) -> TrackerSet:
    """The `TrackerSet` of `train.report_to` (TensorBoard is the MetricsWriter's own)."""
    name = run_name or output_dir.resolve().name
    trackers: list[Tracker] = []
    if "mlflow" in names:
        uri = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        trackers.append(MlflowTracker(uri, name, os.environ.get("MLFLOW_EXPERIMENT_NAME", "mmpo-jax")))
    if "wandb" in names:
        trackers.append(WandbTracker(output_dir, name, os.environ.get("WANDB_PROJECT", "mmpo-jax")))
    return TrackerSet(trackers, output_dir, flat_config(config), changes, resume_step, say)
