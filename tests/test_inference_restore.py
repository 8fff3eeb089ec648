"""The inference-only restore (`run_restore.restore_inference`, what eval, export, generate
and compare read): the policy of a run's checkpoint without its optimizer moments or (unless
asked) its reference, equal to the whole restore (`restore_run`) array for array, and the eval
through it equal to the eval through the whole state."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mmpo_jax.config import load_config
from mmpo_jax.train import loop
from mmpo_jax.train.checkpoint import SKIP, Checkpointer
from mmpo_jax.train.preference_eval import evaluate
from mmpo_jax.train.run_data import load_data
from mmpo_jax.train.run_restore import abstract_state, restore_inference, restore_run

TINY = "configs/tiny.yaml"
SHORT = ["train.max_steps=2", "train.save_every=0", "train.eval_every=0", "train.eval_batches=1"]


def _run(tmp_path_factory, name: str, overrides: list[str]):
    out = tmp_path_factory.mktemp(name)
    cfg = load_config(TINY, [*SHORT, *overrides, f"train.output_dir={out}"])
    assert loop.train(cfg, log=lambda _: None).status == "finished"
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A full fine-tune with a `separate` reference: the state holds AdamW's two moments and
    the reference copy besides the policy."""
    return _run(tmp_path_factory, "full", ["model.reference=separate"])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _run(tmp_path_factory, "lora", ["model.lora.rank=4", "model.reference=lora_base"])


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _assert_equal_trees(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.sharding == y.sharding
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_policy_as_whole_restore(run, whole) -> None:
    for part in ("trainable", "frozen", "rest", "step", "rng"):
        _assert_equal_trees(getattr(run.state, part), getattr(whole.state, part))


@pytest.mark.slow
def test_the_policy_alone_is_restored_as_the_whole_restore_has_it(full_run):
    whole, step = restore_run(full_run)
    run, run_step = restore_inference(full_run)
    assert run_step == step == 2
    _assert_policy_as_whole_restore(run, whole)
    # nothing else was allocated: no optimizer moments, no reference copy
    assert run.state.opt_state == () and run.state.reference is None
    policy = _nbytes((run.state.trainable, run.state.frozen, run.state.rest, run.state.step, run.state.rng))
    assert _nbytes(run.state) == policy
    params = _nbytes(whole.state.trainable)
    # the whole state: the policy, the reference (float32 here) and AdamW's mu and nu
    assert _nbytes(whole.state) >= policy + 3 * params
    # the policy module built from it is the run's
    module = run.sdef.policy(run.state)
    assert module.options == whole.sdef.policy(whole.state).options


def test_eval_through_the_inference_restore_matches_the_whole_state(full_run):
    whole, _ = restore_run(full_run)
    run, _ = restore_inference(full_run, reference=True)
    assert run.state.opt_state == ()
    _assert_equal_trees(run.state.reference, whole.state.reference)
    test = load_data(run.cfg).test
    assert test is not None
    ours = evaluate(run, run.state, test, None, max_batches=2)
    theirs = evaluate(whole, whole.state, test, None, max_batches=2)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, err_msg=key)


@pytest.mark.slow
def test_a_lora_run_restores_its_base_weights_and_adapters(lora_run):
    whole, _ = restore_run(lora_run)
    run, _ = restore_inference(lora_run)
    assert run.sdef.lora and jax.tree.leaves(run.state.frozen)  # the base weights
    _assert_policy_as_whole_restore(run, whole)
    assert run.state.opt_state == () and run.state.reference is None


def test_skipped_leaves_are_never_read(full_run):
    """A `SKIP` leaf of a restore target comes back as `SKIP`: orbax reads nothing for it."""
    whole, _ = restore_run(full_run)
    target = abstract_state(whole.state)
    target = target.replace(opt_state=jax.tree.map(lambda _: SKIP, target.opt_state))
    with Checkpointer(full_run, keep=1, read_only=True) as ckpt:
        restored = ckpt.restore_latest(target)
    assert restored is not None
    assert all(leaf is SKIP for leaf in jax.tree.leaves(restored.state.opt_state))
    _assert_equal_trees(restored.state.trainable, whole.state.trainable)
