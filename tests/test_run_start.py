"""The start of `mmpo-jax train`: cheap checks before anything is loaded, a run directory
left as it was by a start that fails, a finished run told from its files, and the end's
summary (stages, before/after, next commands)."""

import json
import os
from pathlib import Path

import pytest

from mmpo_jax import cli
from mmpo_jax.config import config_to_yaml, load_config
from mmpo_jax.errors import UserError
from mmpo_jax.train import loop, report, run_config, run_data, run_restore
from mmpo_jax.train.run_lock import RunLock

TINY = "configs/tiny.yaml"


def _no_loading(monkeypatch):
    """Fails the test if the run reads its tokenizer, data or model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run loaded the data or the model before its cheap checks")

    monkeypatch.setattr(run_data, "load_data", refuse)
    monkeypatch.setattr(loop, "build_trainer", refuse)


def make_complete_step(checkpoints: Path, step: int, config_yaml: str = "") -> None:
    """A step directory with the files that make it complete (orbax's commit marker and
    metadata that parse) and the config it was saved with, for the checks that read
    only the files."""
    from mmpo_jax.train.checkpoint import _COMMIT_MARKER, _JSON_FILES

    step_dir = checkpoints / str(step)
    for rel in _JSON_FILES:
        (step_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / rel).write_text("{}")
    (step_dir / "config" / "metadata").write_text(json.dumps({"config_yaml": config_yaml}))
    (step_dir / _COMMIT_MARKER).write_text("")


def _old_run(tmp_path: Path) -> tuple[Path, dict[Path, bytes]]:
    """A run directory holding an earlier run's files (their bytes, to compare after)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    files = {run / "config.yaml": b"loss:\n  name: dpo\n", run / "metrics.jsonl": b'{"step": 1, "loss": 0.5}\n'}
    for path, data in files.items():
        path.write_bytes(data)
    return run, files


@pytest.mark.parametrize("bad, named", [
    ("data.train_files=nope.jsonl", "data.train_files: no such file 'nope.jsonl'"),
    ("data.test_files=[missing/test.jsonl]", "data.test_files: no such file 'missing/test.jsonl'"),
    ("model.path=./no/such/model", "model.path='./no/such/model'"),
    ("model.path=no_such_model.gguf", "model.path='no_such_model.gguf'"),
])
def test_a_bad_path_stops_before_loading_and_changes_nothing(tmp_path, monkeypatch, capsys, bad, named):
    run, files = _old_run(tmp_path)
    _no_loading(monkeypatch)
    assert cli.main(["train", TINY, f"train.output_dir={run}", bad]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    for path, data in files.items():
        assert path.read_bytes() == data, path  # the earlier run's config.yaml was rewritten before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]


def test_a_failed_start_does_not_create_the_output_directory(tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    out = tmp_path / "new-run"
    assert cli.main(["train", TINY, f"train.output_dir={out}", "data.train_files=nope.jsonl"]) == 2
    assert not out.exists()


@pytest.mark.parametrize("value, named", [("", "train.output_dir is empty"), ("FILE", "is a file")])
def test_an_output_dir_that_cannot_hold_a_run_is_refused(tmp_path, monkeypatch, value, named):
    _no_loading(monkeypatch)
    if value == "FILE":
        value = str(tmp_path / "a-file")
        Path(value).write_text("mine\n")
    cfg = load_config(TINY, [f"train.output_dir={value}"])
    with pytest.raises(UserError, match=named):
        loop.train(cfg)
    if value != "":
        assert Path(value).read_text() == "mine\n"


def test_a_batch_larger_than_the_data_stops_before_the_model(tmp_path, monkeypatch):
    run, files = _old_run(tmp_path)
    data = tmp_path / "three.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "chosen": " yes", "rejected": " no"}}\n' for i in range(3)))
    monkeypatch.setattr(loop, "build_trainer", lambda *a, **k: pytest.fail("the model was built"))
    cfg = load_config(TINY, [f"train.output_dir={run}", f"data.train_files={data}", "data.test_files=null",
                             "data.batch_size=8"])
    with pytest.raises(UserError, match=r"data.batch_size=8 is larger than the 3 training rows kept"):
        loop.train(cfg, log=lambda _: None)
    for path, contents in files.items():
        assert path.read_bytes() == contents


def test_a_finished_run_is_told_from_its_checkpoints_without_loading(tmp_path, monkeypatch, capsys):
    """A complete checkpoint at train.max_steps saved with this config: no data, no model,
    no file touched, exit 0; a change a resume may make (how often it logs) passes too."""
    run, files = _old_run(tmp_path)
    make_complete_step(run / "checkpoints", 20, config_to_yaml(load_config(TINY, [f"train.output_dir={run}"])))
    _no_loading(monkeypatch)
    assert cli.main(["train", TINY, f"train.output_dir={run}", "train.log_every=5"]) == 0
    out = capsys.readouterr().out
    assert "already holds a finished run (20 of train.max_steps=20 steps)" in out
    for path, data in files.items():
        assert path.read_bytes() == data


@pytest.mark.parametrize("change", ["loss.name=dpo", "loss.beta=0.7", "data.train_files=builtin:demo-standard"])
def test_another_config_into_a_finished_run_is_refused(tmp_path, monkeypatch, capsys, change):
    """`train X && export` must not ship another config's finished model: a run-defining
    difference is exit 2 naming the key and --allow-config-change (it used to say
    "already holds a finished run" and exit 0), and the flag accepts the run as it is."""
    run, files = _old_run(tmp_path)
    make_complete_step(run / "checkpoints", 20, config_to_yaml(load_config(TINY, [f"train.output_dir={run}"])))
    _no_loading(monkeypatch)
    assert cli.main(["train", TINY, f"train.output_dir={run}", change]) == 2
    err = capsys.readouterr().err
    assert "finished run trained with another config" in err and change.split("=")[0] in err, err
    assert "--allow-config-change" in err
    assert cli.main(["train", TINY, f"train.output_dir={run}", change, "--allow-config-change"]) == 0
    assert "already holds a finished run" in capsys.readouterr().out
    for path, data in files.items():
        assert path.read_bytes() == data


def test_an_incomplete_last_checkpoint_is_not_a_finished_run(tmp_path):
    make_complete_step(tmp_path / "checkpoints", 10)
    make_complete_step(tmp_path / "checkpoints", 20)
    (tmp_path / "checkpoints" / "20" / "commit_success.txt").unlink()
    assert run_restore.latest_complete_step(tmp_path) == 10
    assert run_restore.latest_complete_step(tmp_path / "nothing-here") is None


def test_the_end_summary_compares_the_first_and_last_eval(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "eval/loss": 18.77, "eval/rewards/accuracies": 0.0, "eval/logps/chosen": -19.58}\n'
        '{"step": 1, "loss": 14.5}\n'
        '{"step": 6, "eval/loss": 12.11, "eval/rewards/accuracies": 0.8125, "eval/logps/chosen": -12.92}\n'
    )
    lines = report.end_summary(tmp_path, tmp_path, lora=True, has_test=True)
    assert lines[:4] == ["eval, step 0 -> step 6:", "  rewards/accuracies 0 -> 0.8125",
                         "  logps/chosen -19.58 -> -12.92", "  loss 18.77 -> 12.11"]
    text = "\n".join(lines)
    for command in (f"mmpo-jax eval {tmp_path}", f"mmpo-jax generate {tmp_path} --prompts",
                    f"mmpo-jax export {tmp_path} {tmp_path}-hf", "--adapter",
                    f"tensorboard --logdir {tmp_path / 'tensorboard'}"):
        assert command in text, command
    # no test data: no eval to compare and no `eval` command to suggest
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 14.5}\n')
    lines = report.end_summary(tmp_path, tmp_path, lora=False, has_test=False)
    assert lines[0] == "next:" and not any("mmpo-jax eval" in line or "--adapter" in line for line in lines)


def test_stages_print_what_and_how_long():
    said, now = [], iter([0.0, 1.0, 3.25])
    stages = report.Stages(said.append, clock=lambda: next(now))
    stages.start("loading the model x")
    stages.end("model: 1 parameter")
    assert said == ["loading the model x ...", "model: 1 parameter (2.2 s)"]
    assert [report.count_text(n) for n in (512, 4_900_000, 134_515_008, 987_600)] == ["512", "4.9M", "134.5M", "987.6K"]



def _half_done_run(tmp_path: Path) -> Path:
    """A tiny run with a complete checkpoint at step 10 of 20."""
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"train.output_dir={run}"])
    make_complete_step(run / "checkpoints", 10, config_to_yaml(cfg))
    return run


@pytest.mark.parametrize("change", ["loss.name=dpo", "loss.beta=0.7", "data.batch_size=4", "optim.learning_rate=1e-2"])
def test_a_resume_that_changes_the_objective_or_batch_is_refused(tmp_path, monkeypatch, capsys, change):
    run = _half_done_run(tmp_path)
    _no_loading(monkeypatch)
    assert cli.main(["train", TINY, f"train.output_dir={run}", change]) == 2
    err = capsys.readouterr().err
    assert change.split("=")[0] in err and "--allow-config-change" in err, err
    assert not (run / run_config.CONFIG_CHANGES_FILE).exists() and not (run / "config.yaml").exists()


@pytest.mark.parametrize("argv", [["train.max_steps=30", "train.eval_every=5", "mesh.data=1"],
                                  ["loss.beta=0.7", "--allow-config-change"]])
def test_a_safe_change_or_an_allowed_one_passes_the_resume_check(tmp_path, monkeypatch, argv):
    run = _half_done_run(tmp_path)
    _no_loading(monkeypatch)  # past the resume check, the run goes on to load the data
    with pytest.raises(AssertionError, match="loaded the data"):
        cli.main(["train", TINY, f"train.output_dir={run}", *argv])


def test_a_second_run_on_a_directory_in_use_is_refused(tmp_path, monkeypatch, capsys):
    run = _half_done_run(tmp_path)
    _no_loading(monkeypatch)
    with RunLock(run) as lock:
        lock.claim()
        assert cli.main(["train", TINY, f"train.output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another run (pid {os.getpid()} on host " in err, err
    # released: the next run gets past the lock (to the loading, refused here)
    with pytest.raises(AssertionError, match="loaded the data"):
        cli.main(["train", TINY, f"train.output_dir={run}"])


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_notice(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": "gone"}))
    said: list[str] = []
    with RunLock(tmp_path, said.append) as lock:
        lock.claim()
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"pid {2 ** 22 + 7} on host gone" in said[0], said
    assert not (tmp_path / ".lock").exists()  # released cleanly: nothing left, no notice next time
    said.clear()
    with RunLock(tmp_path, said.append) as lock:
        lock.claim()
    assert said == []


@pytest.mark.parametrize("raised, exit_code, needles", [
    (OSError(28, "No space left on device", "/runs/x/checkpoints/10/state"), 2,
     ["'/runs/x/checkpoints/10/state': No space left on device", "Free space"]),
    (OSError(30, "Read-only file system", "/ro/run"), 2, ["'/ro/run': Read-only file system", "writable"]),
    (KeyboardInterrupt(), 130, ["mmpo-jax: interrupted"]),
])
def test_disk_and_interrupt_errors_are_one_line(monkeypatch, capsys, raised, exit_code, needles):
    """A full disk, a read-only directory (root ignores permission bits, so the error is
    raised here as the file system raises it) or a second Ctrl-C: one line, no traceback."""
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(loop, "train", fail)
    assert cli.main(["train", TINY]) == exit_code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_other_os_errors_still_raise(monkeypatch):
    monkeypatch.setattr(loop, "train", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(OSError):
        cli.main(["train", TINY])


def test_eval_json_is_strict_json(monkeypatch, capsys):
    """`eval --json` printed `NaN` (not JSON); a non-finite metric is null, as in metrics.jsonl."""
    import math
    from types import SimpleNamespace

    from mmpo_jax.eval import run as eval_run  # what `mmpo-jax eval` imports as it runs

    monkeypatch.setattr(eval_run, "load_target", lambda target, overrides: (None, 3, target))
    monkeypatch.setattr(eval_run, "evaluate_trainer", lambda *a, **k: SimpleNamespace(
        metrics={"eval/loss": math.nan, "eval/rewards/accuracies": 0.5, "eval/logps/chosen": -math.inf}))
    assert cli.main(["eval", "some-run", "--json"]) == 0

    def refuse(name):
        raise AssertionError(f"not JSON: {name}")

    got = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert got == {"step": 3, "eval/loss": None, "eval/rewards/accuracies": 0.5, "eval/logps/chosen": None}


@pytest.mark.parametrize("where, named", [
    ("/dev/null", "train.output_dir='/dev/null' is a character device, not a directory"),
    ("/proc/self/mmpo-run", "is on the kernel's 'proc' file system, which cannot hold a run's files"),
    ("DANGLING_CHECKPOINTS", "checkpoints' is a symlink to '"),
    ("DANGLING_OUTPUT_DIR", "run' is a symlink to '"),
])
def test_an_output_dir_no_run_can_live_in_is_refused_at_start(tmp_path, monkeypatch, capsys, where, named):
    """Before: the model was loaded, then a FileExistsError / FileNotFoundError traceback."""
    if where.startswith("/proc") and not Path("/proc/self/mounts").exists():
        pytest.skip("no /proc file system here")
    _no_loading(monkeypatch)
    if where == "DANGLING_CHECKPOINTS":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "checkpoints").symlink_to(tmp_path / "gone")
        where = str(tmp_path / "run")
    elif where == "DANGLING_OUTPUT_DIR":
        (tmp_path / "run").symlink_to(tmp_path / "gone")
        where = str(tmp_path / "run")
    assert cli.main(["train", TINY, f"train.output_dir={where}"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "gone").exists()


def test_symlinks_to_directories_are_fine_output_dirs(tmp_path):
    """Negative control: a run directory, or its checkpoints, elsewhere through a symlink."""
    from mmpo_jax.train.preflight import check_local_output_dir

    (tmp_path / "disk" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run").symlink_to(tmp_path / "disk")
    check_local_output_dir(str(tmp_path / "run"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoints").symlink_to(tmp_path / "disk" / "checkpoints")
    check_local_output_dir(str(tmp_path / "other"))
    check_local_output_dir(str(tmp_path / "not-yet" / "run"))


@pytest.mark.slow
def test_a_run_says_autos_attention_choice_once_at_start(tmp_path):
    """`model.attention=auto`'s choice and its reason: one start line of the run."""
    said: list[str] = []
    cfg = load_config(TINY, ["train.max_steps=1", "train.eval_every=0", "train.save_every=0",
                             "data.test_files=null", f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.model.attention == "auto"
    assert loop.train(cfg, log=said.append).status == "finished"
    chosen = [line for line in said if line.startswith("attention: model.attention=auto -> ")]
    assert len(chosen) == 1 and chosen[0].endswith(")"), said
