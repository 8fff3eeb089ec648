"""The train step at library level: training moves the policy from the reference, and a
non-finite step leaves the state bit-identical. (Meshes, reference modes, accumulation:
tests/test_train_parity.py; PyTorch parity: tests/test_step_vs_torch.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.config import load_config
from mmpo_jax.config_schema import MeshConfig
from mmpo_jax.data.layout import DeviceBatch
from mmpo_jax.models.build import build_model
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.options import ModelOptions
from mmpo_jax.sharding import make_mesh
from mmpo_jax.train.optim import learning_rate_schedule, make_optimizer
from mmpo_jax.train.reference import reference_mode
from mmpo_jax.train.state import create_state, state_shardings
from mmpo_jax.train.step import StepConfig, make_train_step

ARCH = DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
PAIRS, SEQ, STEPS = 8, 16, 3


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, ARCH.vocab_size, (PAIRS, 2, SEQ)).astype(np.int32)
    mask = np.zeros((PAIRS, 2, SEQ), np.int32)
    for p in range(PAIRS):  # completions of different lengths, right padding after them
        start, end = 4 + p % 3, 9 + p % 5
        mask[p, :, start:end] = 1
        ids[p, :, end:] = 0
    pair_mask = np.ones(PAIRS, np.int32)
    pair_mask[-1] = 0  # one padding pair
    return DeviceBatch(input_ids=ids, loss_mask=mask, pair_mask=pair_mask)


def _run(mesh_shape, devices, steps=STEPS, poison=False, learning_rate=1e-2):
    cfg = load_config(None, ["optim.learning_rate=1e-2", "loss.aux_weight=0", "optim.grad_accum=2"])
    # past the config's check (it refuses inf; the library must too)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, learning_rate=learning_rate))
    mesh = make_mesh(MeshConfig(*mesh_shape), devices=jax.devices()[:devices])
    model = build_model(ARCH, ModelOptions(scan_layers=True, remat="full"), mesh=mesh, seed=0,
                        init_scale=0.5)
    opt = make_optimizer(cfg.optim, 10)
    sdef, state = create_state(model, opt, lora=False, reference_mode=reference_mode("separate"), mesh=mesh)
    scfg = StepConfig(loss=cfg.loss, grad_accum=cfg.optim.grad_accum, logprob_chunk=8,
                      schedule=learning_rate_schedule(cfg.optim, 10), dropout=False)
    batch = _batch()
    step = make_train_step(sdef, scfg, opt, mesh, state_shardings(state), batch)
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    if poison:
        return state, step, batch, history
    return history


@pytest.fixture(scope="module")
def single_device():
    return _run((1, 1, 1), 1, poison=True)


def test_policy_moves_and_reference_stays(single_device):
    _, _, _, history = single_device
    losses = [h["loss"] for h in history]
    assert losses[0] > losses[-1], losses  # training lowers the loss
    # the first step's policy equals the reference: implicit rewards are 0
    assert abs(history[0]["rewards/chosen"]) < 1e-6 and abs(history[0]["rewards/margins"]) < 1e-6
    assert abs(history[-1]["rewards/margins"]) > 1e-4
    assert all(h["nonfinite"] == 0 for h in history)


def test_nonfinite_step_leaves_state_bit_identical(single_device):
    state, step, batch, _ = single_device
    # a NaN in one weight makes the loss and every gradient non-finite
    emb = state.trainable["embed_tokens"]
    poisoned_value = emb.get_value().at[3, 0].set(jnp.nan)
    state = state.replace(trainable=jax.tree.map(lambda x: x, state.trainable))
    state.trainable["embed_tokens"].set_value(poisoned_value)
    before = jax.tree.map(lambda x: np.asarray(x).copy(), state)
    after, metrics = step(state, batch)
    assert float(metrics["nonfinite"]) == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_nonfinite_update_of_finite_gradients_is_not_applied():
    """Finite loss and gradients, but an update that is not (a learning rate of inf):
    the weights stay as they were, and the step says so. It used to apply NaN weights
    that were then saved as a good checkpoint."""
    state, step, batch, history = _run((1, 1, 1), 1, steps=1, poison=True, learning_rate=float("inf"))
    assert np.isfinite(history[0]["loss"]) and np.isfinite(history[0]["grad_norm"])
    assert history[0]["nonfinite"] == 1.0
    assert int(state.step) == 0
    for leaf in jax.tree.leaves(state.trainable):
        assert np.all(np.isfinite(np.asarray(leaf)))
