"""Multi-process runs: start-up resolution, device splitting, and a real 2-process run of
configs/tiny.yaml (jax.distributed on 127.0.0.1, 4 CPU devices each) against one
process with 8 devices, then resumed in one process."""

import json
import signal
import subprocess
import sys
import time

import pytest

from cpu_env import cli_env
from mmpo_jax import distributed
from mmpo_jax.launch import process_envs
from mmpo_jax.errors import UserError


def test_flags_win_over_environment():
    env = {"MMPO_COORDINATOR": "10.0.0.1:99", "MMPO_NUM_PROCESSES": "4", "MMPO_PROCESS_ID": "3"}
    assert distributed.spec_from(environ=env) == distributed.ProcessSpec("10.0.0.1:99", 4, 3)
    assert distributed.spec_from("h:1", 2, 1, environ=env) == distributed.ProcessSpec("h:1", 2, 1)
    assert distributed.spec_from(environ={}) == distributed.ProcessSpec()


@pytest.mark.parametrize("kwargs, words", [
    ({"coordinator": "h:1"}, "all of"),
    ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "[0, 2)"),
])
def test_bad_process_specs_name_the_fix(kwargs, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace(")", r"\)")):
        distributed.spec_from(environ={}, **kwargs)


def test_cluster_detection():
    assert distributed.cluster_detected({"SLURM_NTASKS": "4"})
    assert not distributed.cluster_detected({"SLURM_NTASKS": "1"})
    assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert not distributed.cluster_detected({})


def test_launch_splits_cpu_devices_and_gpus():
    envs = process_envs(2, 1234, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --x=1"}, [])
    assert [e["XLA_FLAGS"] for e in envs] == ["--xla_force_host_platform_device_count=4 --x=1"] * 2
    assert [e["MMPO_PROCESS_ID"] for e in envs] == ["0", "1"]
    assert envs[1]["MMPO_COORDINATOR"] == "127.0.0.1:1234" and envs[1]["MMPO_NUM_PROCESSES"] == "2"
    gpu = process_envs(2, 1, {}, ["0", "1", "2", "3"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in gpu] == ["0,1", "2,3"]
    with pytest.raises(UserError, match="do not split"):
        process_envs(3, 1, {}, ["0", "1"])


def _run(args, devices, timeout=900):
    done = subprocess.run([sys.executable, "-m", "mmpo_jax.cli", *args], env=cli_env(devices), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# constant learning rate: the schedule does not depend on train.max_steps, so a run of 10
# steps continued to 15 follows the run of 15
COMMON = ["optim.schedule=constant", "optim.warmup_steps=0", "data.test_files=null", "train.save_every=5"]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    """The losses of a 15-step one-process run (8 devices): the reference of both tests."""
    one = tmp_path_factory.mktemp("one")
    _run(["train", "configs/tiny.yaml", f"train.output_dir={one}", "train.max_steps=15", *COMMON], 8)
    return _losses(one)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_in_one(tmp_path, one_process_losses):
    two = tmp_path / "two"
    _run(["launch", "--local-processes", "2", "configs/tiny.yaml", f"train.output_dir={two}",
          "train.max_steps=10", *COMMON], 8)
    a, b = one_process_losses, _losses(two)
    assert sorted(b) == list(range(1, 11))
    for step in range(1, 11):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert (two / "checkpoints" / "10" / "commit_success.txt").exists()
    # the 2-process checkpoint resumes in one process (8 devices) and continues as the 1-process run
    done = _run(["train", "configs/tiny.yaml", f"train.output_dir={two}", "train.max_steps=15", *COMMON], 8)
    assert "resuming from" in done.stdout
    c = _losses(two)
    for step in range(11, 16):
        assert c[step] == pytest.approx(a[step], rel=1e-5), step


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_the_resume_is_exact(tmp_path, one_process_losses):
    """A preemption notice to process 1 only: JAX's preemption service makes both
    processes stop after the same step, save one checkpoint there together and exit
    143; resumed (in two processes again), the run's losses equal an uninterrupted
    one-process run's."""
    from mmpo_jax.launch import free_port

    two = tmp_path / "two"
    args = ["configs/tiny.yaml", f"train.output_dir={two}", "train.max_steps=12", *COMMON]
    envs = process_envs(2, free_port(), cli_env(8), [])
    procs = [subprocess.Popen([sys.executable, "-m", "mmpo_jax.cli", "train", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for env in envs]
    try:
        deadline = time.time() + 600
        while not (two / "metrics.jsonl").exists() or max(_losses(two), default=0) < 2:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "the run ended early"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143, 143], [o[-1500:] for o in outputs]
    stopped = max(_losses(two))
    assert 2 <= stopped < 12 and (two / "checkpoints" / str(stopped) / "commit_success.txt").exists()
    _run(["launch", "--local-processes", "2", *args], 8)
    a, b = one_process_losses, _losses(two)  # a constant learning rate: 12 of 15 steps are the same
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_launch_waits_for_processes_that_stop_on_a_signal(tmp_path, capsys):
    """Processes that exit 143 (or 130) stopped on a signal after their save: the
    launcher waits for the others to stop too and exits with that status; a process
    that fails meanwhile is reported as a failure."""
    from mmpo_jax.launch import wait_all

    def proc(code, delay):
        return subprocess.Popen([sys.executable, "-c", f"import sys, time; time.sleep({delay}); sys.exit({code})"])

    assert wait_all([proc(143, 0.1), proc(143, 1.5)], tmp_path) == 143
    assert capsys.readouterr().err == ""
    assert wait_all([proc(143, 0.1), proc(3, 1.0)], tmp_path) == 3
    assert "process 1 exited with status 3" in capsys.readouterr().err
