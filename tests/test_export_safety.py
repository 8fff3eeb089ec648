"""`export` never deletes or overwrites a file it did not write, and never leaves a
half-written export: OUT must be new, empty, or (with --overwrite) an earlier export and
nothing else; the export is written beside OUT and renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mmpo_jax.export_sources import check_not_a_source
from mmpo_jax.errors import UserError
from mmpo_jax.models import export_dir as E
from mmpo_jax.models.hf_export import export_hf
from mmpo_jax.models.build import build_model
from mmpo_jax.models.hf_weights import iter_hf_weights
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.options import ModelOptions

SAFETENSORS_INDEX = "model.safetensors.index.json"
ARCH = DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def model():
    return build_model(ARCH, ModelOptions(), seed=0)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(out: Path) -> list[str]:
    """Hidden temporary directories an export left beside `out`."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_new_and_empty_destinations_get_an_export_with_its_record(model, tmp_path):
    new = export_hf(model, ARCH, None, tmp_path / "a" / "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(model, ARCH, None, empty, about={"step": 3})
    for out in (new, empty):
        record = json.loads((out / E.EXPORT_MARKER).read_text())
        assert record["written_by"] == "mmpo-jax export" and record["kind"] == "hf"
        assert record["files"] == ["config.json", "model.safetensors"]
        assert sorted(p.name for p in out.iterdir()) == ["config.json", E.EXPORT_MARKER, "model.safetensors"]
        assert _siblings(out) == []
    assert json.loads((empty / E.EXPORT_MARKER).read_text())["step"] == 3


def test_a_foreign_directory_is_refused_and_untouched(model, tmp_path):
    """Today's bug: every *.safetensors in OUT was deleted and config.json overwritten."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "other-model.safetensors").write_bytes(b"someone else's weights")
    (out / "config.json").write_text('{"mine": true}')
    (out / SAFETENSORS_INDEX).write_text("{}")
    before = _snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"is not empty .* not an earlier export .*nothing was changed"):
            export_hf(model, ARCH, None, out, overwrite=overwrite)
        assert _snapshot(out) == before
    assert _siblings(out) == []


def test_an_earlier_export_is_replaced_only_with_overwrite(model, tmp_path):
    out = export_hf(model, ARCH, None, tmp_path / "out", max_shard_bytes=64 * 1024)
    sharded = _snapshot(out)
    assert SAFETENSORS_INDEX in sharded and len([n for n in sharded if n.endswith(".safetensors")]) > 1
    with pytest.raises(UserError, match="holds an earlier export; pass --overwrite"):
        export_hf(model, ARCH, None, out)
    assert _snapshot(out) == sharded
    export_hf(model, ARCH, None, out, overwrite=True, dtype="bfloat16")  # one file now: shards go
    assert sorted(_snapshot(out)) == ["config.json", E.EXPORT_MARKER, "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _siblings(out) == []


def test_an_earlier_export_with_a_users_file_in_it_is_refused_even_with_overwrite(model, tmp_path):
    out = export_hf(model, ARCH, None, tmp_path / "out")
    (out / "notes.md").write_text("my notes")
    (out / "eval").mkdir()
    before = _snapshot(out)
    with pytest.raises(UserError, match=r"files it did not write \(eval, notes.md\)"):
        export_hf(model, ARCH, None, out, overwrite=True)
    assert _snapshot(out) == before


def test_a_failing_export_leaves_the_destination_as_it_was(model, tmp_path):
    def weights_then_failure():
        for i, item in enumerate(iter_hf_weights(model)):
            if i == 3:
                raise OSError(28, "No space left on device")
            yield item

    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match=r"No space left on device.*nothing was changed \('.*fresh' was not created\)"):
        export_hf(model, ARCH, None, fresh, weights=weights_then_failure())
    assert not fresh.exists() and _siblings(fresh) == []

    earlier = export_hf(model, ARCH, None, tmp_path / "earlier")
    before = _snapshot(earlier)
    with pytest.raises(UserError, match=r"nothing was changed \('.*earlier' is as it was\)"):
        export_hf(model, ARCH, None, earlier, overwrite=True, weights=weights_then_failure())
    assert _snapshot(earlier) == before and _siblings(earlier) == []

    def interrupted():
        yield from list(iter_hf_weights(model))[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_hf(model, ARCH, None, earlier, overwrite=True, weights=interrupted())
    assert _snapshot(earlier) == before and _siblings(earlier) == []


def test_a_record_naming_files_outside_the_export_is_not_trusted(model, tmp_path):
    out = export_hf(model, ARCH, None, tmp_path / "out")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    record = json.loads((out / E.EXPORT_MARKER).read_text())
    record["files"].append("../victim.txt")
    (out / E.EXPORT_MARKER).write_text(json.dumps(record))
    with pytest.raises(UserError, match="is not a record mmpo-jax export wrote"):
        export_hf(model, ARCH, None, out, overwrite=True)
    (out / E.EXPORT_MARKER).write_text("{not json")
    with pytest.raises(UserError, match="is not a record mmpo-jax export wrote"):
        export_hf(model, ARCH, None, out, overwrite=True)
    assert victim.read_text() == "keep me"


def test_a_file_or_a_symlinked_destination(model, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        export_hf(model, ARCH, None, a_file)
    assert a_file.read_text() == "x"
    real = export_hf(model, ARCH, None, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    export_hf(model, ARCH, None, link, overwrite=True)  # replaces the export the link points at
    assert link.is_symlink() and (real / E.EXPORT_MARKER).is_file()


def _cfg(path: str = "", reference_path: str = "") -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(path=path, reference_path=reference_path))


def test_never_into_the_run_directory_or_the_models_it_reads(model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    base = export_hf(model, ARCH, None, tmp_path / "base")  # an earlier export: --overwrite would take it
    ref = tmp_path / "refs" / "ref.gguf"
    ref.parent.mkdir()
    ref.write_bytes(b"GGUF")
    cfg = _cfg(str(base), str(ref))
    with pytest.raises(UserError, match=r"is the run directory.*e.g. '.*run/export'"):
        check_not_a_source(run, run, cfg)
    with pytest.raises(UserError, match=r"is the run's model.path"):
        check_not_a_source(base, run, cfg)
    with pytest.raises(UserError, match=r"holds the run's model.reference_path"):
        check_not_a_source(ref.parent, run, cfg)
    with pytest.raises(UserError, match=r"holds the run directory"):
        check_not_a_source(tmp_path, run, cfg)
    os.symlink(base, tmp_path / "base-link")
    with pytest.raises(UserError, match=r"is the run's model.path"):
        check_not_a_source(tmp_path / "base-link", run, cfg)
    check_not_a_source(run / "export", run, cfg)  # allowed
    check_not_a_source(tmp_path / "elsewhere", run, _cfg("HuggingFaceTB/SmolLM2-135M-Instruct"))


def test_cli_refuses_before_restoring_the_run(tmp_path, capsys, monkeypatch):
    """A refused destination is told at once, before the run's model and state load."""
    from mmpo_jax import config as config_mod
    from mmpo_jax.cli import main
    from mmpo_jax.train import run_restore

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.bin").write_bytes(np.arange(4, dtype=np.uint8).tobytes())
    run = tmp_path / "run"
    loaded = []
    monkeypatch.setattr(run_restore, "saved_run_config", lambda run_dir: (config_mod.load_config(None), 5))
    monkeypatch.setattr(run_restore, "restore_inference", lambda *a, **k: loaded.append(a))
    assert main(["export", str(run), str(out)]) == 2
    assert loaded == []
    err = capsys.readouterr().err
    assert "is not empty (keep.bin)" in err and "Traceback" not in err
    assert (out / "keep.bin").read_bytes() == bytes(range(4))


def test_never_into_what_the_run_manages(tmp_path):
    """`export RUN RUN/checkpoints/99` was accepted, and the next train moved it aside as a
    broken checkpoint; RUN/export stays the user's."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for inside in ("checkpoints/99", "checkpoints", "checkpoints_incomplete/x", "reference_logps", "tensorboard/a"):
        with pytest.raises(UserError, match=r"is inside the run's \w+/ directory, which the run manages"):
            check_not_a_source(run / inside, run, _cfg())
    check_not_a_source(run / "export", run, _cfg())
    check_not_a_source(run / "checkpoints-export", run, _cfg())


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_killed_exports_leftovers_are_cleared_by_the_next(model, tmp_path):
    """A SIGKILLed export left `.out.tmp-*` / `.out.old-*` beside OUT for good."""
    out = export_hf(model, ARCH, None, tmp_path / "out")
    before = _snapshot(out)
    dead = _dead_pid()
    half = tmp_path / f".out.tmp-{dead}-aaaaaa"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    replaced = tmp_path / f".out.old-{dead}-bbbbbb"  # an earlier export, moved aside, then killed
    export_hf(model, ARCH, None, tmp_path / "earlier")
    os.rename(tmp_path / "earlier", replaced)
    live = tmp_path / f".out.tmp-{os.getpid()}-cccccc"  # an export still running: left alone
    live.mkdir()
    with pytest.warns(UserWarning, match="left by a killed export"):
        export_hf(model, ARCH, None, out, overwrite=True)
    assert _siblings(out) == [live.name] and _snapshot(out) == before

    # killed between its two renames: OUT is gone and the earlier export is beside it
    os.rename(out, tmp_path / f".out.old-{dead}-dddddd")
    with pytest.warns(UserWarning, match="moved .* back to"):
        with pytest.raises(UserError, match="holds an earlier export; pass --overwrite"):
            export_hf(model, ARCH, None, out)
    assert _snapshot(out) == before
