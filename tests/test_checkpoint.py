"""Checkpointer: sharded round trips, resume on another mesh, keep, incomplete steps, mismatches.

The state is a small stand-in for TrainState (a flax.struct dataclass of a dict
of params, an optax adam state, an int step and RNG key data), sharded over the
8 simulated CPU devices of tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from checkpoint_helpers import flip_a_byte, largest_array_file

from mmpo_jax.errors import UserError
from mmpo_jax.train.checkpoint import (
    CHECKPOINTS_DIR,
    CHECKSUMS_FILE,
    INCOMPLETE_DIR,
    Checkpointer,
    corruption_reason,
    incomplete_reason,
    tree_mismatches,
)

CONFIG = "loss:\n  name: mmpo\n  beta: 0.1\ntrain:\n  output_dir: runs/x  # ünïcode ok\n"


@flax.struct.dataclass
class State:
    step: jax.Array  # int32 []
    params: dict[str, jax.Array]
    opt_state: Any
    rng: jax.Array  # uint32 [2]


# Partition specs by param name: the sharded layout of the save mesh.
SPECS = {"w": P("fsdp", "tensor"), "b": P("tensor"), "e": P(None, "fsdp")}
SHAPES = {"w": (8, 4), "b": (4,), "e": (3, 8)}


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _specs_for(mesh: jax.sharding.Mesh) -> dict[str, P]:
    # Drop axes the mesh does not have, so one spec table serves every mesh.
    def keep(spec: P) -> P:
        return P(*(a if a in mesh.axis_names else None for a in spec))

    return {k: keep(v) for k, v in SPECS.items()}


def make_state(mesh: jax.sharding.Mesh, seed: int = 0) -> State:
    """A state with distinct values everywhere, params and their adam moments sharded.

    Built on the host and placed with one device_put: eager jax ops on sharded
    arrays would compile once each, which dominates a small test's time.
    """
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in SHAPES.items()}
    # Non-zero moments and count, different from the params.
    opt_state = jax.tree.map(
        lambda x: (rng.standard_normal(x.shape) * 0.1).astype(x.dtype)
        if np.issubdtype(x.dtype, np.floating)
        else np.asarray(rng.integers(1, 100), x.dtype),
        optax.adam(1e-2).init(params),
    )
    host = State(
        step=np.int32(7 + seed),
        params=params,
        opt_state=opt_state,
        rng=rng.integers(0, 2**32, size=(2,), dtype=np.uint32),
    )
    return jax.device_put(host, shardings_on(mesh, host))


def shardings_on(mesh: jax.sharding.Mesh, state: State) -> State:
    """Param-like leaves (keyed w/b/e, in params or adam moments) sharded by SPECS; the rest replicated."""
    specs = _specs_for(mesh)

    def sharding(path, _):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return NamedSharding(mesh, specs[keys[-1]] if keys else P())

    return jax.tree_util.tree_map_with_path(sharding, state)


def abstract_on(state: State, sharding_of) -> State:
    """The restore target: ShapeDtypeStructs with the shardings `sharding_of(x)` gives."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), state)


def assert_identical(a: State, b: State) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def save_mesh() -> jax.sharding.Mesh:
    return _mesh((2, 2, 2), ("data", "fsdp", "tensor"))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, save_mesh) -> tuple[Path, dict[int, State]]:
    """A run dir with complete checkpoints at steps 1 and 2 (keep=3), saved on the 2x2x2 mesh."""
    out = tmp_path_factory.mktemp("run")
    states = {1: make_state(save_mesh, seed=1), 2: make_state(save_mesh, seed=2)}
    with Checkpointer(out, keep=3) as ckpt:
        for step, state in states.items():
            assert ckpt.save(step, state, CONFIG + f"# step {step}\n")
    return out, states


def copy_run(saved_run, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(saved_run[0], out)
    return out


def test_round_trip_sharded_is_bit_identical(saved_run, save_mesh):
    out, states = saved_run
    with Checkpointer(out, keep=3) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.latest_step() == 2
        target = abstract_on(states[2], lambda x: x.sharding)
        restored, config = ckpt.restore(None, target)
    assert config == CONFIG + "# step 2\n"
    assert isinstance(restored, State)
    assert_identical(restored, states[2])
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding


def test_restore_onto_another_mesh_and_one_device(saved_run):
    out, states = saved_run
    other = _mesh((4, 2), ("data", "fsdp"))  # no tensor axis, fsdp across other devices
    on_other = shardings_on(other, states[1])

    one = SingleDeviceSharding(jax.devices()[3])
    with Checkpointer(out, keep=3, read_only=True) as ckpt:
        target = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), states[1], on_other
        )
        restored, _ = ckpt.restore(1, target)
        single, _ = ckpt.restore(1, abstract_on(states[1], lambda x: one))
    assert_identical(restored, states[1])
    assert_identical(single, states[1])
    assert restored.params["e"].sharding == NamedSharding(other, P(None, "fsdp"))
    assert restored.opt_state[0].mu["w"].sharding == NamedSharding(other, P("fsdp", None))
    assert all(x.sharding == one for x in jax.tree.leaves(single))


def test_keep_two_keeps_the_last_two(tmp_path, save_mesh):
    state = make_state(save_mesh)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (2, 4, 6):
            assert ckpt.save(step, state, CONFIG)
        assert ckpt.all_steps() == [4, 6]
    on_disk = sorted(int(p.name) for p in (tmp_path / CHECKPOINTS_DIR).iterdir() if p.name.isdigit())
    assert on_disk == [4, 6]
    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() == 6


def test_saving_a_saved_step_again_is_a_no_op(tmp_path, save_mesh):
    state = make_state(save_mesh)
    with Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
        assert ckpt.save(3, state, CONFIG)
        # e.g. the SIGINT save right after the periodic one: blocking, saves nothing
        assert not ckpt.save(3, make_state(save_mesh, seed=5), "other", wait=True)
        restored, config = ckpt.restore(3, abstract_on(state, lambda x: x.sharding))
    assert config == CONFIG
    assert_identical(restored, state)


def _break_marker(step_dir: Path) -> None:
    (step_dir / "commit_success.txt").unlink()


def _truncate_metadata(step_dir: Path) -> None:
    meta = step_dir / "state" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_break_marker, _truncate_metadata], ids=["no-marker", "truncated"])
def test_incomplete_latest_is_skipped_for_the_one_before(saved_run, tmp_path, save_mesh, damage):
    out = copy_run(saved_run, tmp_path)
    ckdir = out / CHECKPOINTS_DIR
    shutil.copytree(ckdir / "2", ckdir / "3")
    damage(ckdir / "3")
    # and an orbax temporary dir of a save cut off even earlier in its life
    shutil.copytree(ckdir / "2", ckdir / "4.orbax-checkpoint-tmp-1234567")
    assert incomplete_reason(ckdir / "3") is not None
    assert incomplete_reason(ckdir / "2") is None

    with pytest.warns(UserWarning) as caught:
        ckpt = Checkpointer(out, keep=3)
    messages = " ".join(str(w.message) for w in caught)
    assert str(ckdir / "3") in messages and "4.orbax-checkpoint-tmp-1234567" in messages
    with ckpt:
        assert ckpt.latest_step() == 2
        restored, config = ckpt.restore(None, abstract_on(saved_run[1][2], lambda x: x.sharding))
        assert_identical(restored, saved_run[1][2])
        assert config.endswith("# step 2\n")
        # moved aside, not deleted: step 3 can be saved again
        moved = sorted(p.name.split(".")[0] for p in (out / INCOMPLETE_DIR).iterdir())
        assert moved == ["3", "4"]
        assert ckpt.save(3, make_state(save_mesh, seed=3), CONFIG)
        assert ckpt.all_steps() == [1, 2, 3]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


@pytest.mark.parametrize("damage,reason", [
    (_truncate, "truncated or overwritten"), (_zero, "SHA-256 does not match"),
    (Path.unlink, "missing"), (flip_a_byte, "SHA-256 does not match"),
], ids=["truncated", "zeroed", "deleted", "one-flipped-byte"])
def test_a_corrupt_latest_is_moved_aside_and_the_one_before_restored(saved_run, tmp_path, damage, reason):
    """Damage to an array file of the latest step (which its metadata checks cannot see):
    a writable Checkpointer moves the step aside, naming the file, and restores the
    step before; read-only, restoring it is refused naming the file."""
    out = copy_run(saved_run, tmp_path)
    ckdir = out / CHECKPOINTS_DIR
    assert (ckdir / "2" / CHECKSUMS_FILE).is_file() and corruption_reason(ckdir / "2") is None
    target = largest_array_file(ckdir / "2")
    damage(target)
    assert incomplete_reason(ckdir / "2") is None  # the marker and metadata are intact
    assert reason in corruption_reason(ckdir / "2")

    with Checkpointer(out, keep=3, read_only=True) as ro:
        assert ro.latest_step() == 2
        with pytest.raises(UserError, match=rf"corrupt: '{target.relative_to(ckdir / '2')}'.*steps \[1\]"):
            ro.restore(None, abstract_on(saved_run[1][2], lambda x: x.sharding))
    with pytest.warns(UserWarning, match=rf"skipping corrupt checkpoint '{ckdir / '2'}'.*{reason}"):
        ckpt = Checkpointer(out, keep=3)
    with ckpt:
        assert ckpt.latest_step() == 1
        restored, config = ckpt.restore(None, abstract_on(saved_run[1][1], lambda x: x.sharding))
        assert_identical(restored, saved_run[1][1])
        assert config.endswith("# step 1\n")
    assert [p.name.split(".")[0] for p in (out / INCOMPLETE_DIR).iterdir()] == ["2"]


def test_a_step_saved_without_checksums_is_taken_as_it_is(saved_run, tmp_path):
    """Checkpoints written before checksums existed resume as before."""
    out = copy_run(saved_run, tmp_path)
    (out / CHECKPOINTS_DIR / "2" / CHECKSUMS_FILE).unlink()
    assert corruption_reason(out / CHECKPOINTS_DIR / "2") is None
    with Checkpointer(out, keep=3) as ckpt:
        restored, _ = ckpt.restore(None, abstract_on(saved_run[1][2], lambda x: x.sharding))
    assert_identical(restored, saved_run[1][2])


def test_read_only_skips_incomplete_without_moving(saved_run, tmp_path):
    out = copy_run(saved_run, tmp_path)
    ckdir = out / CHECKPOINTS_DIR
    shutil.copytree(ckdir / "2", ckdir / "3")
    _break_marker(ckdir / "3")
    with pytest.warns(UserWarning, match="incomplete checkpoint .*3"):
        ckpt = Checkpointer(out, keep=3, read_only=True)
    with ckpt:
        assert ckpt.all_steps() == [1, 2]
        with pytest.raises(UserError, match="no complete checkpoint for step 3"):
            ckpt.restore(3, abstract_on(saved_run[1][2], lambda x: x.sharding))
        with pytest.raises(ValueError, match="read-only"):
            ckpt.save(5, saved_run[1][2], CONFIG)
    assert (ckdir / "3").is_dir() and not (out / INCOMPLETE_DIR).exists()


def _read_only_notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Given directory is read only")]


def test_read_only_open_logs_no_read_only_notice(saved_run, caplog):
    """eval, export and generate open the run read-only: orbax's 'Given directory is read
    only=...' absl warning is dropped, while other absl warnings still get through."""
    import logging

    import orbax.checkpoint as ocp
    from absl import logging as absl_logging

    from mmpo_jax.train.checkpoint import _quiet_read_only_notice

    out, _ = saved_run
    caplog.set_level(logging.WARNING)  # every logger, absl's included
    with Checkpointer(out, keep=3, read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2]
    assert _read_only_notices(caplog) == []
    # negative control: orbax's own manager, read-only, without the filter, does log it
    options = ocp.CheckpointManagerOptions(save_interval_steps=0, preservation_policy=None,
                                           read_only=True, create=False)
    ocp.CheckpointManager(out / CHECKPOINTS_DIR, options=options).close()
    assert _read_only_notices(caplog) == [f"Given directory is read only={out / CHECKPOINTS_DIR}"]
    caplog.clear()
    with _quiet_read_only_notice():
        absl_logging.warning("Given directory is read only=%s", "x")
        absl_logging.warning("another orbax warning=%s", "y")
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == ["another orbax warning=y"]
    absl_logging.warning("Given directory is read only=%s", "z")  # the filter is gone afterwards
    assert _read_only_notices(caplog) == ["Given directory is read only=z"]


def test_mismatched_target_names_the_leaf(saved_run):
    out, states = saved_run
    state = states[2]
    wider = state.replace(params={**state.params, "w": np.zeros((8, 6), np.float32)})
    extra = state.replace(params={**state.params, "lora_a": np.zeros((2, 2), np.float32)})
    half = state.replace(params={**state.params, "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete run dir warns about nothing
        ckpt = Checkpointer(out, keep=3, read_only=True)
    with ckpt:
        with pytest.raises(UserError, match=r"params\.w: shape \(8, 4\) in the checkpoint, \(8, 6\)") as err:
            ckpt.restore(2, abstract_on(wider, lambda x: SingleDeviceSharding(jax.devices()[0])))
        assert "new train.output_dir" in str(err.value)
        with pytest.raises(UserError, match=r"params\.lora_a: in this run's state, not in the checkpoint"):
            ckpt.restore(2, abstract_on(extra, lambda x: SingleDeviceSharding(jax.devices()[0])))
        with pytest.raises(UserError, match=r"params\.b: dtype float32 in the checkpoint, bfloat16"):
            ckpt.restore(2, abstract_on(half, lambda x: SingleDeviceSharding(jax.devices()[0])))


def test_tree_mismatches_lists_every_kind():
    s = jax.ShapeDtypeStruct
    saved = {"a": s((2,), jnp.float32), "b": s((3,), jnp.float32), "gone": s((), jnp.int32)}
    wanted = {"a": s((2,), jnp.float32), "b": s((4,), jnp.bfloat16), "new": s((), jnp.int32)}
    assert tree_mismatches(saved, wanted) == [
        "gone: in the checkpoint, not in this run's state",
        "new: in this run's state, not in the checkpoint",
        "b: shape (3,) in the checkpoint, (4,) in this run",
        "b: dtype float32 in the checkpoint, bfloat16 in this run",
    ]
    assert tree_mismatches(saved, dict(saved)) == []


def test_config_text_round_trips_and_empty_dir(tmp_path, saved_run):
    out, _ = saved_run
    with Checkpointer(out, keep=3, read_only=True) as ckpt:
        assert ckpt.read_config(1) == CONFIG + "# step 1\n"
        assert ckpt.read_config() == CONFIG + "# step 2\n"
    with Checkpointer(tmp_path / "fresh", keep=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(UserError, match="no complete checkpoint in"):
            ckpt.restore(None, {})
    with pytest.raises(UserError, match="keep_checkpoints=0"):
        Checkpointer(tmp_path, keep=0)


def test_abstract_leaf_without_sharding_is_refused(saved_run):
    out, states = saved_run
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[1])
    with Checkpointer(out, keep=3, read_only=True) as ckpt:
        with pytest.raises(ValueError, match="without a sharding"):
            ckpt.restore(1, target)


# -- checksums as part of the save; unverified steps; a live run's rotation ----------------


def _sha256_manifest(step_dir: Path, names: set[str]) -> dict[str, dict[str, Any]]:
    """The manifest entries of `names`, computed here with hashlib (not the code under test)."""
    import hashlib

    return {rel: {"bytes": (step_dir / rel).stat().st_size,
                  "sha256": hashlib.sha256((step_dir / rel).read_bytes()).hexdigest()} for rel in names}


def _files(step_dir: Path) -> set[str]:
    return {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()}


def test_a_committed_step_has_its_checksums_before_the_checkpointer_waits(tmp_path, save_mesh):
    """The checksums are part of the save: once orbax has committed an async save (and a
    SIGKILL could come), the step holds them, equal to hashlib's; the next `wait()` adds the
    two files orbax's commit writes. A flipped byte then fails them (negative control)."""
    import json

    with Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
        assert ckpt.save(1, make_state(save_mesh), CONFIG)
        ckpt._manager.wait_until_finished()  # orbax is done; this Checkpointer has not waited
        step_dir = tmp_path / CHECKPOINTS_DIR / "1"
        assert (step_dir / "commit_success.txt").is_file()
        manifest = json.loads((step_dir / CHECKSUMS_FILE).read_text())["files"]
        committed_later = {"_CHECKPOINT_METADATA", "commit_success.txt"}
        assert manifest == _sha256_manifest(step_dir, _files(step_dir) - {CHECKSUMS_FILE} - committed_later)
        assert corruption_reason(step_dir) is None
        ckpt.wait()
    manifest = json.loads((step_dir / CHECKSUMS_FILE).read_text())["files"]
    assert manifest == _sha256_manifest(step_dir, _files(step_dir) - {CHECKSUMS_FILE})
    flip_a_byte(largest_array_file(step_dir))
    assert "SHA-256 does not match" in corruption_reason(step_dir)


def test_the_checksums_are_written_on_the_save_thread_before_the_commit(tmp_path, save_mesh, monkeypatch):
    """An async `save` returns while its checksums are being written (the loop does not wait
    for the hashing), and orbax commits the step only after they are."""
    import threading

    from mmpo_jax.train import checkpoint

    release, seen = threading.Event(), []
    real = checkpoint.write_checksums

    def slow_write(step_dir, skip=()):
        seen.append((threading.current_thread() is threading.main_thread(), Path(step_dir).name))
        assert release.wait(60)
        real(step_dir, skip)

    monkeypatch.setattr(checkpoint, "write_checksums", slow_write)
    with Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
        assert ckpt.save(4, make_state(save_mesh), CONFIG)  # returns with the write blocked
        for _ in range(600):
            if seen:
                break
            threading.Event().wait(0.05)
        assert seen == [(False, "4.orbax-checkpoint-tmp")]  # a save thread, on the uncommitted dir
        assert not (tmp_path / CHECKPOINTS_DIR / "4").exists()
        release.set()
        ckpt.wait()
    assert (tmp_path / CHECKPOINTS_DIR / "4" / CHECKSUMS_FILE).is_file()


def test_a_step_whose_checksums_cannot_be_written_is_not_committed(tmp_path, save_mesh, monkeypatch):
    """A complete step always has its checksums: a failed write fails the save, and the step
    is left to be moved aside as incomplete."""
    import errno

    from mmpo_jax.train import checkpoint

    def full_disk(step_dir, skip=()):
        raise OSError(errno.ENOSPC, "No space left on device", str(step_dir))

    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.save(1, make_state(save_mesh), CONFIG)
    monkeypatch.setattr(checkpoint, "write_checksums", full_disk)
    ckpt = Checkpointer(tmp_path, keep=2, async_save=True)
    ckpt.save(2, make_state(save_mesh, seed=2), CONFIG)
    with pytest.raises(Exception, match="No space left"):
        ckpt.wait()
    with contextlib.suppress(Exception):
        ckpt.close()
    assert not (tmp_path / CHECKPOINTS_DIR / "2" / "commit_success.txt").exists()
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        again = Checkpointer(tmp_path, keep=2)
    with again:
        assert again.all_steps() == [1]


def _unverified_nan(ckdir: Path, save_mesh) -> str:
    """Step 3: saved with a NaN weight and an inf moment, then its checksums removed (as a
    version before them left it)."""
    state = make_state(save_mesh, seed=3)
    state = state.replace(params={**state.params, "w": state.params["w"].at[0, 0].set(jnp.nan)})
    mu = state.opt_state[0].mu
    state = state.replace(opt_state=(state.opt_state[0]._replace(mu={**mu, "b": mu["b"].at[1].set(jnp.inf)}),
                                     *state.opt_state[1:]))
    with Checkpointer(ckdir.parent, keep=3) as ckpt:
        assert ckpt.save(3, state, CONFIG)
    (ckdir / "3" / CHECKSUMS_FILE).unlink()
    return "2 of its arrays are not finite (opt_state.0.mu.b, params.w)"


def _unverified_unreadable(ckdir: Path, save_mesh) -> str:
    """Step 3: step 2's files without checksums, one byte of its sharding metadata flipped."""
    shutil.copytree(ckdir / "2", ckdir / "3")
    (ckdir / "3" / CHECKSUMS_FILE).unlink()
    flip_a_byte(ckdir / "3" / "state" / "_sharding")
    return "reading it failed"


@pytest.mark.parametrize("damage", [_unverified_nan, _unverified_unreadable], ids=["not-finite", "unreadable"])
def test_an_unverified_damaged_step_is_set_aside_for_the_one_before(saved_run, tmp_path, save_mesh, damage):
    """A step without checksums is checked when restored: arrays that are not finite (or
    files that do not parse) set it aside, named, and the step before is restored; it can be
    saved again. Read-only (eval, export, generate), it is skipped and the step used is said."""
    out = copy_run(saved_run, tmp_path)
    ckdir = out / CHECKPOINTS_DIR
    why = damage(ckdir, save_mesh)
    assert corruption_reason(ckdir / "3") is None and incomplete_reason(ckdir / "3") is None
    target = abstract_on(saved_run[1][2], lambda x: x.sharding)

    notes: list[str] = []
    with Checkpointer(out, keep=3, read_only=True) as ro:
        restored = ro.restore_latest(target, notes.append)
    assert restored.step == 2 and restored.config_yaml.endswith("# step 2\n")
    assert_identical(restored.state, saved_run[1][2])
    assert len(notes) == 1 and f"skipping checkpoint '{ckdir / '3'}'" in notes[0] and why in notes[0]
    assert "using step 2" in notes[0] and not (out / INCOMPLETE_DIR).exists()

    with pytest.warns(UserWarning, match=rf"skipping unverified checkpoint '{ckdir / '3'}'.*{re.escape(why)}"):
        with Checkpointer(out, keep=3) as ckpt:
            restored = ckpt.restore_latest(target)
            assert restored.step == 2 and ckpt.moved_corrupt == [ckdir / "3"]
            assert_identical(restored.state, saved_run[1][2])
            assert ckpt.save(3, make_state(save_mesh, seed=3), CONFIG)  # orbax no longer counts the old one
            assert ckpt.all_steps() == [1, 2, 3]
    assert [p.name.split(".")[0] for p in (out / INCOMPLETE_DIR).iterdir()] == ["3"]


def test_read_only_says_which_step_it_uses_instead_of_a_corrupt_latest(saved_run, tmp_path):
    out = copy_run(saved_run, tmp_path)
    ckdir = out / CHECKPOINTS_DIR
    damaged = largest_array_file(ckdir / "2")
    flip_a_byte(damaged)
    notes: list[str] = []
    with Checkpointer(out, keep=3, read_only=True) as ro:
        restored = ro.restore_latest(abstract_on(saved_run[1][1], lambda x: x.sharding), notes.append)
    assert restored.step == 1
    assert_identical(restored.state, saved_run[1][1])
    assert notes == [f"skipping checkpoint '{ckdir / '2'}': '{damaged.relative_to(ckdir / '2')}' differs from "
                     "what the save wrote (its SHA-256 does not match); using step 1, the newest intact one "
                     "(a train run of this directory moves the other aside)"]
    flip_a_byte(largest_array_file(ckdir / "1"))
    with Checkpointer(out, keep=3, read_only=True) as ro:
        with pytest.raises(UserError, match=r"no intact checkpoint in .*step 2: .*; step 1: .*SHA-256"):
            ro.restore_latest(abstract_on(saved_run[1][1], lambda x: x.sharding), notes.append)


def test_a_step_deleted_while_read_only_reads_it_is_said_to_have_vanished(saved_run, tmp_path, save_mesh):
    """A live run saves step 3 and its rotation deletes step 2 after eval listed it: the read
    raises StepVanished (choose again), not a corruption; a damaged step with no newer one
    saved is a corruption (negative control)."""
    from mmpo_jax.train.checkpoint import StepVanished

    out = copy_run(saved_run, tmp_path)
    ckdir = out / CHECKPOINTS_DIR
    target = abstract_on(saved_run[1][2], lambda x: x.sharding)
    with Checkpointer(out, keep=3, read_only=True) as ro:
        with Checkpointer(out, keep=1) as live:
            assert live.save(3, make_state(save_mesh, seed=3), CONFIG)
        assert sorted(p.name for p in ckdir.iterdir() if p.name.isdigit()) == ["3"]
        with pytest.raises(StepVanished) as gone:
            ro.restore_latest(target)
        assert gone.value.step == 2
    with Checkpointer(out, keep=3, read_only=True) as ro:
        assert ro.restore_latest(target).step == 3

    flip_a_byte(largest_array_file(ckdir / "3"))
    with Checkpointer(out, keep=3, read_only=True) as ro:
        with pytest.raises(UserError, match="no intact checkpoint .*step 3: .*SHA-256"):
            ro.restore_latest(target)


def test_a_checkpoints_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / CHECKPOINTS_DIR).write_text("not a directory\n")
    for read_only in (False, True):
        with pytest.raises(UserError, match=rf"'{tmp_path / CHECKPOINTS_DIR}' is a file, not the run's directory"):
            Checkpointer(tmp_path, keep=2, read_only=read_only)
    assert (tmp_path / CHECKPOINTS_DIR).read_text() == "not a directory\n"
