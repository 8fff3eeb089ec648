"""The run (`mmpo-jax train`): exact resume after SIGKILL, the non-finite stop, SIGINT,
eval of a run directory, and export (full, and the LoRA adapter loaded by PEFT)."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoint_helpers import flip_a_byte, largest_array_file
from cpu_env import cli_env
from mmpo_jax.config import load_config
from mmpo_jax.train import loop, run_restore, run_signals

TINY = "configs/tiny.yaml"
TIMING = {"tokens_per_second"}


def _env():
    return cli_env(1)  # one CPU device: the runs here test the loop, not the mesh


def _cli(*args):
    return [sys.executable, "-m", "mmpo_jax.cli", *args]


def _records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _train_records(run_dir):
    return {r["step"]: r for r in _records(run_dir) if "loss" in r}


def _wait_for(predicate, proc, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before the condition held")
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    done = subprocess.run(_cli("train", TINY, f"train.output_dir={out}"), env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.slow
def test_straight_run_writes_metrics_and_checkpoints(straight_run):
    out, done = straight_run
    records = _records(out)
    train = _train_records(out)
    assert sorted(train) == list(range(1, 21))
    for key in ("loss", "rewards/accuracies", "grad_norm", "learning_rate", "tokens_per_second"):
        assert key in train[5], key
    evals = [r["step"] for r in records if "eval/loss" in r]
    assert evals == [0, 10, 20]  # before training, every train.eval_every=10, at the end
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [10, 20]
    assert "step 20/20" in done.stdout + done.stderr
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(out / "config.yaml").train.max_steps == 20


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_straight_run(straight_run, tmp_path):
    ref, _ = straight_run
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", TINY, f"train.output_dir={out}"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def past_checkpoint():
            ckpt = out / "checkpoints" / "10" / "commit_success.txt"
            try:
                return ckpt.exists() and max(_train_records(out)) >= 12
            except (FileNotFoundError, ValueError, json.JSONDecodeError):
                return False

        _wait_for(past_checkpoint, proc, 600)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.run(_cli("train", TINY, f"train.output_dir={out}"), env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert steps == list(range(1, 21))  # each step once: 11 and 12 of the killed run were dropped
    want, got = _train_records(ref), _train_records(out)
    for step in range(11, 21):
        for key, value in want[step].items():
            if key in TIMING:
                continue
            assert got[step][key] == value, (step, key, got[step][key], value)
    evals = {r["step"]: r for r in _records(out) if "eval/loss" in r}
    ref_evals = {r["step"]: r for r in _records(ref) if "eval/loss" in r}
    assert evals[20] == ref_evals[20]


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_resumes_from_the_one_before(straight_run, tmp_path):
    """One flipped byte in the final checkpoint's arrays: the run moves it aside, resumes
    from step 10 and reproduces steps 11-20 exactly; with every checkpoint corrupt it
    stops saying so."""
    ref, _ = straight_run
    out = tmp_path / "corrupt"
    shutil.copytree(ref, out)
    flip_a_byte(largest_array_file(out / "checkpoints" / "20"))
    done = subprocess.run(_cli("train", TINY, f"train.output_dir={out}"), env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping corrupt checkpoint" in done.stderr and "resuming from" in done.stdout
    assert [p.name.split(".")[0] for p in (out / "checkpoints_incomplete").iterdir()] == ["20"]
    want, got = _train_records(ref), _train_records(out)
    assert sorted(got) == list(range(1, 21))
    for step in range(11, 21):
        assert {k: v for k, v in got[step].items() if k not in TIMING} == \
            {k: v for k, v in want[step].items() if k not in TIMING}, step

    for step in ("10", "20"):
        flip_a_byte(largest_array_file(out / "checkpoints" / step))
    stopped = subprocess.run(_cli("train", TINY, f"train.output_dir={out}"), env=_env(), capture_output=True,
                             text=True, timeout=900)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "every checkpoint of" in stopped.stderr and "nothing is left to resume from" in stopped.stderr


@pytest.mark.slow
def test_nonfinite_step_stops_the_run(tmp_path, capsys):
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", "train.max_steps=6", "train.save_every=2",
                             "train.eval_every=0", "data.test_files=null", "mesh.data=1"])
    trainer = loop.build_trainer(cfg, devices=jax.devices()[:1])
    real_step, calls = trainer.train_step, []

    def poisoned(state, batch):
        calls.append(1)
        if len(calls) == 3:  # a NaN weight: the loss and every gradient of step 3 are NaN
            emb = state.trainable["embed_tokens"]
            emb.set_value(emb.get_value().at[0, 0].set(jnp.nan))
        return real_step(state, batch)

    trainer.train_step = poisoned
    with pytest.raises(loop.NonFiniteStep) as err:
        loop.train(cfg, trainer=trainer)
    message = str(err.value)
    assert "step 3" in message and str(tmp_path / "checkpoints" / "2") in message
    assert sorted(_train_records(tmp_path)) == [1, 2]  # nothing of step 3 was written
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2]


def _signal_after(out: Path, step: int, sig: int, *overrides: str) -> tuple[int, str]:
    """`mmpo-jax train` of the tiny config into `out`, sent `sig` once it has logged
    `step`: (its exit status, its output)."""
    proc = subprocess.Popen(_cli("train", TINY, f"train.output_dir={out}", *overrides), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def reached():
            try:
                return max(_train_records(out)) >= step
            except (FileNotFoundError, ValueError, json.JSONDecodeError):
                return False

        _wait_for(reached, proc, 600)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "run"
    code, output = _signal_after(out, 2, signal.SIGINT, "train.max_steps=1000", "train.eval_every=0",
                                 "train.save_every=0")
    assert code == 130, output[-2000:]
    last = max(_train_records(out))
    assert (out / "checkpoints" / str(last) / "commit_success.txt").exists()
    assert "interrupted" in output and "Traceback" not in output


@pytest.mark.slow
def test_sigterm_saves_where_it_stopped_and_the_resume_is_exact(straight_run, tmp_path):
    """A preemption notice (SIGTERM) mid-run: the step in flight finishes, a checkpoint
    of that step is saved, the process exits 143; the resumed run's records equal the
    uninterrupted run's."""
    ref, _ = straight_run
    out = tmp_path / "preempted"
    at = int(np.random.default_rng().integers(2, 8))  # the step to signal at, different each run
    code, output = _signal_after(out, at, signal.SIGTERM)
    assert code == 143, output[-2000:]
    stopped = max(_train_records(out))
    assert stopped < 20 and (out / "checkpoints" / str(stopped) / "commit_success.txt").exists(), output[-2000:]
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    done = subprocess.run(_cli("train", TINY, f"train.output_dir={out}"), env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0 and f"step {stopped} of 20" in done.stdout, done.stderr[-3000:]
    want, got = _train_records(ref), _train_records(out)
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert {k: v for k, v in got[step].items() if k not in TIMING} == \
            {k: v for k, v in want[step].items() if k not in TIMING}, step


def test_eval_of_a_run_directory(straight_run, capsys):
    from mmpo_jax.cli import main

    out, _ = straight_run
    assert main(["eval", str(out), "--json", "train.eval_batches=2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 20
    evals = {r["step"]: r for r in _records(out) if "eval/loss" in r}
    # the same policy and the same first two test batches: the loss of the run's own eval
    # (which averaged 4 batches) is close, and the eval runs through the restored weights
    assert np.isfinite(result["eval/loss"]) and abs(result["eval/loss"] - evals[20]["eval/loss"]) < 5


def test_a_run_directory_is_read_with_its_checkpoint_config(straight_run, tmp_path):
    """eval / export / generate / compare restore a run with the config saved in its
    checkpoint: a config.yaml rewritten since (another loss) or cut short (a full disk
    cut one at 4096 bytes, which still parsed, with defaults for the rest) is not read."""
    import shutil

    out, _ = straight_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "config.yaml").write_text("loss:\n  name: dpo\n  beta: 0.7\n")
    trainer, step = run_restore.restore_run(copy)
    assert step == 20 and trainer.cfg.loss.name == "mmpo" and trainer.cfg.loss.beta == 0.1
    assert trainer.cfg.train.max_steps == 20 and int(trainer.state.step) == 20
    (copy / "config.yaml").unlink()
    assert run_restore.restore_run(copy, ["loss.beta=0.2"])[0].cfg.loss.beta == 0.2  # overrides still apply


def test_train_on_a_finished_run_hands_its_state_to_the_trainer(straight_run):
    """`train(cfg, trainer=t)` on a finished run returns at once, and `t.state` is the
    run's last checkpoint, not the initial weights (a sweep evaluates through it)."""
    from mmpo_jax.train.setup import build_trainer

    out, _ = straight_run
    cfg = load_config(out / "config.yaml", [])
    trainer = build_trainer(cfg)
    assert int(trainer.state.step) == 0
    result = loop.train(cfg, trainer=trainer, log=lambda _: None)
    assert (result.status, result.step) == ("finished", 20)
    assert int(trainer.state.step) == 20


def _torch_logps(model, ids):
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1)
    return torch.gather(lp, -1, torch.as_tensor(ids[:, 1:, None], dtype=torch.long))[..., 0].numpy()


def _our_logps(module, ids):
    from mmpo_jax.logprobs import model_token_logps

    with jax.default_matmul_precision("highest"):
        return np.asarray(model_token_logps(module, jnp.asarray(ids), chunk=16))[:, 1:]


@pytest.mark.slow
def test_export_loads_in_transformers_with_our_logps(straight_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpo_jax.cli import main

    out, _ = straight_run
    assert main(["export", str(out), str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = np.asarray([tok("The capital of France is Paris.")["input_ids"] * 2])
    trainer, step = run_restore.restore_run(out)
    assert step == 20
    ours = _our_logps(trainer.sdef.policy(trainer.state), ids)
    np.testing.assert_allclose(_torch_logps(model, ids), ours, atol=1e-5)


@pytest.mark.slow
def test_lora_adapter_export_loads_with_peft(tmp_path, capsys):
    """A LoRA run from an HF base: PEFT's load of `export --adapter` on the base model equals
    our policy and the merged export."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mmpo_jax.cli import main
    from mmpo_jax.data.tokenizers import load_tokenizer
    from mmpo_jax.models.hf_export import export_hf
    from mmpo_jax.models.build import build_model
    from mmpo_jax.models.decoder_config import model_config_from_init
    from mmpo_jax.models.options import ModelOptions

    cfg0 = load_config(TINY)
    arch = model_config_from_init(cfg0.model.init)
    base_dir = tmp_path / "base"
    export_hf(build_model(arch, ModelOptions(), seed=3), arch, load_tokenizer("builtin:tiny"), base_dir)
    run = tmp_path / "run"
    cfg = load_config(TINY, [f"model.path={base_dir}", "model.lora.rank=4", "model.lora.alpha=8",
                             "model.lora.targets=[q,v,o,up,down]", "optim.learning_rate=3e-2",
                             "train.max_steps=2", "train.eval_every=0", "train.save_every=0",
                             "data.test_files=null", f"train.output_dir={run}"])
    loop.train(cfg)
    base_files = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    for into_base in ([], ["--overwrite"], ["--adapter", "--overwrite"]):  # the base is an earlier export
        assert main(["export", str(run), str(base_dir), *into_base]) == 2
        assert "is the run's model.path" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == base_files
    assert main(["export", str(run), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert main(["export", str(run), str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

    ids = np.random.default_rng(0).integers(3, 2048, (2, 24))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = _torch_logps(base, ids)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    trainer, _ = run_restore.restore_run(run)
    ours = _our_logps(trainer.sdef.policy(trainer.state), ids)
    with_adapter = _torch_logps(peft_model, ids)
    assert np.abs(with_adapter - before).max() > 1e-3  # the adapter changes the model
    np.testing.assert_allclose(with_adapter, ours, atol=1e-5)
    np.testing.assert_allclose(_torch_logps(merged, ids), ours, atol=1e-5)


def test_ctrl_c_on_any_process_stops_every_process(monkeypatch):
    """A multi-process run stops at the same step everywhere (its checkpoint save is
    collective): the local Ctrl-C flag is all-gathered, and any process's flag stops all."""
    from jax.experimental import multihost_utils

    others = {"flag": 0}
    sent = []

    def allgather(x):  # this process's flag, then the other process's
        sent.append(int(x))
        return np.array([int(x), others["flag"]], np.int32)

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    preempted_at: list[int] = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step in preempted_at)
    interrupt = run_signals.Interrupt()
    assert not interrupt.stop_now(1)
    others["flag"] = 1  # Ctrl-C on the other process only
    assert interrupt.stop_now(2)
    interrupt.requested, others["flag"] = signal.SIGINT, 0  # on this one only
    assert interrupt.stop_now(3) and interrupt.exit_status == 130
    assert sent == [0, 0, 1]
    # a SIGTERM anywhere: the preemption service says when every process has reached the step
    interrupt = run_signals.Interrupt()
    preempted_at.append(5)
    assert not interrupt.stop_now(4)
    assert interrupt.stop_now(5) and interrupt.exit_status == 143


@pytest.mark.slow
def test_eval_with_precomputed_reference_computes_the_test_split_only(tmp_path, capsys, monkeypatch):
    """`eval` of a precomputed-reference config runs the reference pass over the test
    split it evaluates, not over the 3150 training rows too."""
    from mmpo_jax.cli import main

    assert main(["eval", TINY, "--json", "model.reference=precomputed", "train.eval_batches=1",
                 f"train.output_dir={tmp_path}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(result["eval/loss"])
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "reference_logps").glob("*.npy"))
    assert cached == ["test"], cached
    # again: the cached table is read and the reference model is never loaded for it
    import mmpo_jax.train.run_data as run_data

    def no_load(trainer):
        raise AssertionError("the reference model was loaded although its table is cached")

    monkeypatch.setattr(run_data, "initial_reference", no_load)
    assert main(["eval", TINY, "--json", "model.reference=precomputed", "train.eval_batches=1",
                 f"train.output_dir={tmp_path}"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["eval/loss"] == result["eval/loss"]


# -- unverified checkpoints, read-only restores, signals, a `checkpoints` file -------------


def _tiny(tmp_path, *overrides):
    return load_config(TINY, [f"train.output_dir={tmp_path}", "train.save_every=2", "train.eval_every=0",
                              "data.test_files=null", "mesh.data=1", *overrides])


def _one_device_trainer(cfg):
    return loop.build_trainer(cfg, devices=jax.devices()[:1])


@pytest.mark.slow
def test_an_unverified_latest_checkpoint_is_checked_when_the_run_resumes(tmp_path):
    """A latest checkpoint without checksums (as a version before them left it) is unverified.
    Finite, the run resumes from it, and a non-finite step after it does not call it good; not
    finite, it is moved aside, named, and the run resumes from the one before, reproducing the
    uninterrupted run's steps exactly."""
    from mmpo_jax.train.checkpoint import CHECKSUMS_FILE, Checkpointer, saved_config_text

    cfg = _tiny(tmp_path, "train.max_steps=4")
    loop.train(cfg, trainer=_one_device_trainer(cfg), log=lambda _: None)
    want = _train_records(tmp_path)
    ckdir = tmp_path / "checkpoints"
    (ckdir / "4" / CHECKSUMS_FILE).unlink()

    longer = _tiny(tmp_path, "train.max_steps=6")
    trainer = _one_device_trainer(longer)
    real_step = trainer.train_step

    def poisoned(state, batch):
        emb = state.trainable["embed_tokens"]
        emb.set_value(emb.get_value().at[0, 0].set(jnp.nan))
        return real_step(state, batch)

    trainer.train_step = poisoned
    with pytest.raises(loop.NonFiniteStep) as err:
        loop.train(longer, trainer=trainer, log=lambda _: None)
    assert "step 5" in str(err.value) and f"the last checkpoint, {ckdir / '4'}, has no checksums" in str(err.value)
    assert "last good checkpoint" not in str(err.value)
    assert not (tmp_path / "checkpoints_incomplete").exists()  # a finite unverified step is taken

    trainer = _one_device_trainer(cfg)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        state = ckpt.restore_latest(run_restore.abstract_state(trainer.state)).state
    text = saved_config_text(ckdir / "4")
    shutil.rmtree(ckdir / "4")
    with Checkpointer(tmp_path, keep=2) as ckpt:  # step 4 again, its arrays damaged into NaNs
        ckpt.save(4, jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, state), text)
    (ckdir / "4" / CHECKSUMS_FILE).unlink()
    said: list[str] = []
    with pytest.warns(UserWarning, match=rf"skipping unverified checkpoint '{ckdir / '4'}'.*arrays are not finite"):
        result = loop.train(cfg, trainer=trainer, log=said.append)
    assert result.status == "finished" and any(f"resuming from {ckdir / '2'}" in line for line in said)
    assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints_incomplete").iterdir()] == ["4"]
    got = _train_records(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert {k: v for k, v in got[step].items() if k not in TIMING} == \
            {k: v for k, v in want[step].items() if k not in TIMING}, step


def test_export_of_a_run_whose_latest_checkpoint_is_corrupt_says_which_step_it_uses(straight_run, tmp_path, capsys):
    """eval / export / generate use the newest intact step and say on stderr which step they
    skipped and why; an intact run is read without a word (negative control)."""
    from mmpo_jax.cli import main

    out, _ = straight_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    damaged = largest_array_file(copy / "checkpoints" / "20")
    flip_a_byte(damaged)
    assert main(["export", str(copy), str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr()
    assert f"exported step 10 of {copy}" in printed.out
    assert json.loads((tmp_path / "hf" / "mmpo_export.json").read_text())["step"] == 10
    assert (f"mmpo-jax: warning: skipping checkpoint '{copy / 'checkpoints' / '20'}': "
            f"'{damaged.relative_to(copy / 'checkpoints' / '20')}' differs from what the save wrote") in printed.err
    assert "using step 10, the newest intact one" in printed.err

    notes: list[str] = []
    trainer, step = run_restore.restore_run(out, say=notes.append)
    assert (step, int(trainer.state.step), notes) == (20, 20, [])


def test_a_checkpoint_rotated_away_while_it_is_read_is_chosen_again(straight_run, tmp_path, monkeypatch):
    """A live run (keep_checkpoints=1) saves a newer step and deletes the one eval / export
    is reading: the newest step is read instead, and said; a run that rotates under every
    read stops after 3 tries with one line."""
    from mmpo_jax.errors import UserError
    from mmpo_jax.train.checkpoint import Checkpointer

    out, _ = straight_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    ckdir = copy / "checkpoints"
    real_restore = Checkpointer.restore
    read: list[int] = []

    def restore_while_the_run_saves(self, step, target, every_time=False):
        if every_time or not read:  # the run saves the next step (a copy of the newest) and rotates
            newest = max(int(p.name) for p in ckdir.iterdir())
            shutil.copytree(ckdir / str(newest), ckdir / f"{newest + 10}")
            for p in ckdir.iterdir():
                if int(p.name) <= newest:
                    shutil.rmtree(p)
        read.append(step)
        return real_restore(self, step, target)

    monkeypatch.setattr(Checkpointer, "restore", restore_while_the_run_saves)
    notes: list[str] = []
    trainer, step = run_restore.restore_run(copy, say=notes.append)
    assert (read, step, int(trainer.state.step)) == ([20, 30], 30, 20)  # step 30 holds step 20's files
    assert notes == [f"checkpoint step 20 of {copy} was deleted while it was read (the run there keeps only "
                     "its newest train.keep_checkpoints); reading the newest one again"]

    monkeypatch.setattr(Checkpointer, "restore",
                        lambda self, step, target: restore_while_the_run_saves(self, step, target, every_time=True))
    with pytest.raises(UserError, match="deleted checkpoint step 50 while it was read, 3 times in a row"):
        run_restore.restore_run(copy, say=notes.append)
    assert read[2:] == [30, 40, 50]


def test_a_checkpoints_file_is_refused_before_the_run_touches_its_metrics(tmp_path, capsys):
    from mmpo_jax.cli import main
    from mmpo_jax.errors import UserError

    (tmp_path / "checkpoints").write_text("notes\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", "train.max_steps=1", "train.eval_every=0",
                             "data.test_files=null"])
    with pytest.raises(UserError, match=rf"'{tmp_path / 'checkpoints'}' is a file, not the run's directory"):
        loop.train(cfg, log=lambda _: None)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    assert (tmp_path / "checkpoints").read_text() == "notes\n"
    assert main(["eval", str(tmp_path)]) == 2
    assert "is a file, not the run's directory of checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_second_signal_exits_with_that_signal_s_status(monkeypatch, capsys, sig):
    """The first signal asks the run to stop; a second of the same kind (e.g. during its
    save) stops it at once, and the process exits 128 + that signal, as a shell reports it."""
    import os

    import mmpo_jax.commands.train as train_command
    from mmpo_jax.cli import main

    monkeypatch.setattr(run_signals, "_leave_the_terminal", lambda: None, raising=False)  # pytest's own output stays

    def run(args):
        with run_signals.Interrupt() as interrupt:
            os.kill(os.getpid(), sig)
            deadline = time.time() + 10
            while interrupt.requested != sig and time.time() < deadline:
                time.sleep(0.01)
            assert interrupt.requested == sig and interrupt.exit_status == 128 + sig
            os.kill(os.getpid(), sig)  # during the save
            time.sleep(10)
        return 0

    monkeypatch.setattr(train_command, "run", run)
    assert main(["train", TINY]) == 128 + sig
    assert "mmpo-jax: interrupted" in capsys.readouterr().err


@pytest.mark.slow
def test_a_closed_terminal_saves_a_checkpoint_and_exits_129(tmp_path):
    """SIGHUP as the kernel sends it when the run's terminal closes (a pty whose master is
    closed): the step in flight finishes, a checkpoint of it is saved, and the process exits
    129, although its terminal is gone."""
    import os
    import pty
    import select

    out = tmp_path / "run"
    master, slave = pty.openpty()
    # a new session whose controlling terminal is the pty, as a shell's job has
    launcher = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                "os.execv(sys.executable, sys.argv[1:])")
    args = _cli("train", TINY, f"train.output_dir={out}", "train.max_steps=1000", "train.eval_every=0",
                "train.save_every=0", "data.test_files=null")
    proc = subprocess.Popen([sys.executable, "-c", launcher, *args], env=_env(), stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        def reached():
            while select.select([master], [], [], 0)[0]:  # drained: a full pty would block the run
                try:
                    os.read(master, 1 << 16)
                except OSError:
                    break
            try:
                return max(_train_records(out)) >= 2
            except (FileNotFoundError, ValueError, json.JSONDecodeError):
                return False

        _wait_for(reached, proc, 600)
        os.close(master)  # the terminal closes: the kernel hangs it up and signals the session
        proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 129
    last = max(_train_records(out))
    assert (out / "checkpoints" / str(last) / "commit_success.txt").exists()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [last]
