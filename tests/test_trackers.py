"""`train.report_to`: MLflow (a real SQLite store; a real server that the test kills) and
W&B (offline mode, read back with wandb's own reader) hold what `metrics.jsonl` holds, a
resumed run logs each step once, and a tracker that fails never stops or stalls the run."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

from mmpo_jax.cli import main  # noqa: E402
from mmpo_jax.config import applicable_dict, load_config  # noqa: E402
from mmpo_jax.errors import UserError  # noqa: E402
from mmpo_jax.train import trackers as T  # noqa: E402
from mmpo_jax.train.metrics import read_metrics  # noqa: E402

TIMING = {"tokens_per_second"}  # differs between a run and its resume; the tracker keeps the first
RUN = ["configs/tiny.yaml", "train.max_steps=4", "train.eval_every=2", "train.eval_batches=1",
       "train.save_every=2", "train.report_to=[mlflow,wandb]", "train.run_name=tiny-run"]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made: each test copies it, since making the
    tables (MLflow's migrations) costs seconds every time."""
    path = tmp_path_factory.mktemp("store") / "empty.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def _store(empty: Path, path: Path) -> str:
    shutil.copyfile(empty, path)
    return f"sqlite:///{path}"


def _mlflow_history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _wandb_history(run_dir: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    rows = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        store = datastore.DataStore()
        store.open_for_scan(path)
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key != "step" and key not in TIMING:
                out.setdefault(key, []).append((record["step"], float("nan") if value is None else value))
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, empty_store):
    """A 4-step run with evals, then the same run resumed from its step-2 checkpoint (the
    last removed, as after a crash): steps 3 and 4 are recomputed, not logged again."""
    root = tmp_path_factory.mktemp("trackers")
    uri = _store(empty_store, root / "mlflow.db")
    env = {"MLFLOW_TRACKING_URI": uri, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    run = root / "run"
    try:
        assert main(["train", *RUN, f"train.output_dir={run}"]) == 0
        first = _expected(run)
        shutil.rmtree(run / "checkpoints" / "4")
        assert main(["train", *RUN, f"train.output_dir={run}"]) == 0
    finally:
        mp.undo()
    return run, uri, first


@pytest.mark.slow
def test_mlflow_holds_every_metric_of_metrics_jsonl_once(tracked_run):
    run, uri, first = tracked_run
    state = json.loads((run / T.STATE_FILE).read_text())
    history = _mlflow_history(uri, state["mlflow"]["run_id"])
    expected = _expected(run)
    assert expected == first  # the resume recomputed steps 3 and 4 exactly
    assert set(history) - TIMING == set(expected)
    for key, points in expected.items():
        assert [s for s, _ in history[key]] == [s for s, _ in points], key  # each step once
        for (_, got), (_, want) in zip(history[key], points):
            assert got == pytest.approx(want, rel=1e-12, nan_ok=True), key
    assert "eval/loss" in history and [s for s, _ in history["eval/loss"]] == [0, 2, 4]
    run_info = mlflow.MlflowClient(tracking_uri=uri).get_run(state["mlflow"]["run_id"])
    params = run_info.data.params
    cfg = load_config(run / "config.yaml")
    # the config's values, less those the run does not read (MMPO reads no loss.loss_type)
    assert params == {k: v[:6000] for k, v in T.flat_config(applicable_dict(cfg)).items()}
    assert params["loss.name"] == "mmpo" and params["train.max_steps"] == "4"
    assert "loss.aux_weight" in params and "loss.loss_type" not in params and "loss.cpo_alpha" not in params
    assert "model.init.hidden_size" in params  # a random init: its shapes are the model
    assert run_info.data.tags["checkpoint"] == str(run / "checkpoints" / "4")
    assert run_info.info.run_name == "tiny-run" and run_info.info.status == "FINISHED"


def test_wandb_offline_runs_hold_every_metric_once(tracked_run):
    run, _, _ = tracked_run
    rows = _wandb_history(run)
    # the resume is a second offline run directory with the same id
    dirs = sorted(glob.glob(str(run / "wandb" / "offline-run-*")))
    state = json.loads((run / T.STATE_FILE).read_text())
    assert len(dirs) == 2 and all(d.endswith(state["wandb"]["run_id"]) for d in dirs)
    expected = _expected(run)
    got: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_"):
                got.setdefault(key, []).append((row["_step"], value))
    assert set(got) - TIMING == set(expected)
    for key, points in expected.items():
        steps, values = zip(*sorted(got[key]))
        assert list(steps) == [s for s, _ in points], key  # each step once, across both directories
        assert list(values) == pytest.approx([v for _, v in points], rel=1e-12), key


def test_report_to_none_writes_metrics_jsonl_only(tmp_path):
    run = tmp_path / "quiet"
    assert main(["train", "configs/tiny.yaml", "train.max_steps=1", "data.test_files=null", "train.report_to=none",
                 f"train.output_dir={run}"]) == 0
    assert (run / "metrics.jsonl").is_file()
    assert not (run / "tensorboard").exists() and not (run / T.STATE_FILE).exists()


def test_a_missing_tracker_package_stops_at_start_with_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    T.check_installed(["tensorboard", "mlflow"])
    with pytest.raises(UserError, match=r"pip install 'mmpo-jax\[wandb\]'"):
        T.check_installed(["mlflow", "wandb"])


def _taken(run_dir: Path):
    try:
        return json.loads((run_dir / T.STATE_FILE).read_text()).get("mlflow", {}).get("last")
    except (FileNotFoundError, ValueError):
        return None


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_server_that_goes_away_is_reported_once_and_never_blocks(tmp_path, empty_store):
    port = _free_port()
    store = _store(empty_store, tmp_path / "server.db")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", store, "--default-artifact-root", str(tmp_path / "artifacts")],
        # no job-queue workers: the tracker logs runs and metrics only
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"

    def kill_server():
        # the server, its uvicorn and job-queue workers (some in sessions of their own) and
        # their children: every descendant, found before any of them dies and is reparented
        for pid in [server.pid, *_descendants(server.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if server.poll() is None:
            server.wait(30)

    try:
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        said: list[str] = []
        tracker = T.MlflowTracker(uri, "gone", "mmpo-jax-test")
        trackers = T.TrackerSet([tracker], tmp_path, {"a": "1"}, [], 0, said.append)
        for step in (1, 2):
            trackers.send({"step": step, "loss": 1.0 / step})
        deadline = time.time() + 60
        while _taken(tmp_path) != [2, 0]:
            assert time.time() < deadline, "the first records never reached the server"
            time.sleep(0.2)
        kill_server()
        assert not _descendants(server.pid)
        begin = time.perf_counter()
        for step in range(3, 200):  # the step loop goes on at full speed
            trackers.send({"step": step, "loss": 1.0 / step})
        assert time.perf_counter() - begin < 1.0
        trackers.close({})
        assert time.perf_counter() - begin < T.CLOSE_TIMEOUT_S + 5
        failures = [s for s in said if "mlflow failed" in s]
        assert len(failures) == 1 and "metrics.jsonl keeps every record" in failures[0], said
    finally:
        kill_server()
    # what it took before the server went is in the store
    history = _mlflow_history(store, tracker.run_id)
    assert history["loss"] == [(1, 1.0), (2, 0.5)]


def test_a_resume_with_config_changes_tags_the_same_mlflow_run(tmp_path, empty_store):
    """MLflow params cannot change: a resume's changes become tags on the run it continues."""
    uri = _store(empty_store, tmp_path / "tags.db")
    said: list[str] = []
    first = T.TrackerSet([T.MlflowTracker(uri, "r", "mmpo-jax-test")], tmp_path, {"train.max_steps": "4"}, [], 0,
                         said.append)
    first.send({"step": 1, "loss": 0.5})
    first.close({"checkpoint": "c/1"})
    run_id = json.loads((tmp_path / T.STATE_FILE).read_text())["mlflow"]["run_id"]
    again = T.TrackerSet([T.MlflowTracker(uri, "r", "mmpo-jax-test")], tmp_path, {"train.max_steps": "6"},
                         ["train.max_steps (4 -> 6)"], 1, said.append)
    # taken before the resume, but computed anew under the changed config: sent again (it
    # kept the first values before), and MLflow's newest value of step 1 is the new one
    again.send({"step": 1, "loss": 9.9})
    again.send({"step": 2, "loss": 0.25})
    again.close({"checkpoint": "c/2"})
    assert json.loads((tmp_path / T.STATE_FILE).read_text())["mlflow"]["run_id"] == run_id
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.params == {"train.max_steps": "4"}
    assert run.data.tags["config_change.step1.train.max_steps"] == "4 -> 6"
    assert run.data.tags["checkpoint"] == "c/2"
    assert _mlflow_history(uri, run_id)["loss"] == [(1, 0.5), (1, 9.9), (2, 0.25)]
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics["loss"] == 0.25
    # no change: an exact resume recomputes the same values, which are not sent twice
    same = T.TrackerSet([T.MlflowTracker(uri, "r", "mmpo-jax-test")], tmp_path, {"train.max_steps": "6"}, [], 2,
                        said.append)
    same.send({"step": 2, "loss": 0.25})
    same.close({"checkpoint": "c/2"})
    assert _mlflow_history(uri, run_id)["loss"] == [(1, 0.5), (1, 9.9), (2, 0.25)]
    assert not T.WandbTracker.relogs_steps  # W&B drops a step below its last: not sent again
    assert said == []
