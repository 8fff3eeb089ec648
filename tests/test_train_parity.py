"""The train step of configs/tiny.yaml run for real: across meshes, across reference
modes, with gradient accumulation, and its compile count across bucket shapes.

Independent checks: the single-device run is the baseline for the meshes; the
accumulation checks recompute the losses from the sequence log-probs with the
loss functions themselves, micro-batch by micro-batch, as the contract defines.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.buckets import bucket_for, bucket_lengths
from mmpo_jax.config import load_config
from mmpo_jax.losses.inputs import LossInputs
from mmpo_jax.losses.registry import configured_loss
from mmpo_jax.data.batches import SMALLEST_BUCKET, train_batches
from mmpo_jax.data.layout import DeviceBatch, device_batch
from mmpo_jax.data.pipeline import load_preference_data
from mmpo_jax.train.pair_logps import pair_logps
from mmpo_jax.train.reference_cache import reference_table
from mmpo_jax.train.setup import build_trainer, initial_reference
from mmpo_jax.train.step import loss_and_grads

from step_compare import assert_same_history

STEPS = 5
# a higher learning rate than tiny.yaml's so that 5 steps move the policy visibly
BASE = ["optim.learning_rate=3e-3", "optim.warmup_steps=0", "train.max_steps=10"]


@pytest.fixture(scope="module")
def train_data():
    cfg = load_config("configs/tiny.yaml")
    return load_preference_data(cfg.data, "train")


def _run(overrides, data, tmp_path, devices=None, steps=STEPS):
    cfg = load_config("configs/tiny.yaml", BASE + [f"train.output_dir={tmp_path}"] + overrides)
    trainer = build_trainer(cfg, devices=devices)
    table = None
    if cfg.model.reference == "precomputed":
        table = reference_table(cfg, lambda: initial_reference(trainer), data, "train", trainer.mesh, lambda s: None)
    batches = train_batches(data, cfg.data.batch_size, cfg.data.seed)
    state, history = trainer.state, []
    for step in range(steps):
        state, metrics = trainer.train_step(state, device_batch(batches[step], trainer.mesh, table))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return history


@pytest.fixture(scope="module")
def one_device(train_data, tmp_path_factory):
    return _run(["mesh.data=1"], train_data, tmp_path_factory.mktemp("one"), devices=jax.devices()[:1])


def test_training_moves_the_policy(one_device):
    losses_ = [h["loss"] for h in one_device]
    assert abs(one_device[0]["rewards/margins"]) < 1e-6  # step 1: the policy is the reference
    assert abs(one_device[-1]["rewards/margins"]) > 1e-3
    assert losses_[-1] < losses_[0]
    assert all(h["nonfinite"] == 0 for h in one_device)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_meshes_match_one_device(shape, one_device, train_data, tmp_path):
    d, f, t = shape
    got = _run([f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"], train_data, tmp_path)
    assert_same_history(got, one_device, f"mesh {shape}")


@pytest.mark.slow
def test_precomputed_reference_matches_separate(one_device, train_data, tmp_path):
    got = _run(["mesh.data=1", "model.reference=precomputed"], train_data, tmp_path, devices=jax.devices()[:1])
    assert_same_history(got, one_device, "precomputed")
    # the table is cached: a second pass reads the file instead of recomputing
    assert len(list((tmp_path / "reference_logps").glob("train-*.npy"))) == 1


@pytest.mark.slow
def test_lora_reference_modes_agree(train_data, tmp_path):
    lora = ["mesh.data=1", "model.lora.rank=4", "optim.learning_rate=3e-2"]
    one = jax.devices()[:1]
    base = _run(lora + ["model.reference=lora_base"], train_data, tmp_path / "a", devices=one)
    assert abs(base[-1]["rewards/margins"]) > 1e-4  # the adapters moved the policy
    for mode in ("separate", "precomputed"):
        got = _run(lora + [f"model.reference={mode}"], train_data, tmp_path / mode, devices=one)
        assert_same_history(got, base, f"lora {mode}")


def _first_batch(cfg, data, trainer):
    host = train_batches(data, cfg.data.batch_size, cfg.data.seed)[0]
    return device_batch(host, trainer.mesh)


def _micro_logps(trainer, batch, n):
    """Policy and reference sequence log-probs `[pairs, 2]` of each strided micro-batch."""
    state, sdef = trainer.state, trainer.sdef
    out = []
    for a in range(n):
        micro = DeviceBatch(input_ids=batch.input_ids[a::n], loss_mask=batch.loss_mask[a::n])
        pol = pair_logps(sdef.policy(state), micro, average=False, chunk=64).logps
        ref = pair_logps(sdef.reference(state), micro, average=False, chunk=64).logps
        out.append((pol, ref))
    return out


@pytest.mark.slow
def test_accumulation_dpo_equals_one_batch(train_data, tmp_path):
    """DPO is a mean over pairs: 4 micro-batches of 2 pairs give the loss and gradient of 8."""
    results = {}
    for n in (1, 4):
        cfg = load_config("configs/tiny.yaml", ["loss.name=dpo", f"optim.grad_accum={n}", "mesh.data=2",
                                                f"train.output_dir={tmp_path}"])
        trainer = build_trainer(cfg, devices=jax.devices()[:2])
        batch = _first_batch(cfg, train_data, trainer)
        # a policy away from the reference, so that the DPO gradient is not all at sigmoid(0)
        state = trainer.state.replace(trainable=jax.tree.map(lambda x: x * 1.05, trainer.state.trainable))
        grads, metrics = jax.jit(lambda s, b: loss_and_grads(trainer.sdef, trainer.scfg, trainer.mesh, s, b))(state, batch)
        results[n] = (jax.device_get(grads), float(metrics["loss"]))
    (g1, l1), (g4, l4) = results[1], results[4]
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.slow
def test_accumulation_mmpo_is_the_mean_of_micro_batch_losses(train_data, tmp_path):
    """MMPO normalises each micro-batch on its own: the step's loss is the mean of the four
    micro-batch losses, each computed from that micro-batch's log-probs alone; it differs
    from the loss of the 8 pairs normalised together."""
    cfg = load_config("configs/tiny.yaml", ["optim.grad_accum=4", "loss.aux_weight=0", "mesh.data=1",
                                            f"train.output_dir={tmp_path}"])
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    state = trainer.state.replace(trainable=jax.tree.map(lambda x: x * 1.05, trainer.state.trainable))
    trainer.state = state
    batch = _first_batch(cfg, train_data, trainer)
    _, metrics = jax.jit(lambda s, b: loss_and_grads(trainer.sdef, trainer.scfg, trainer.mesh, s, b))(state, batch)
    micro = _micro_logps(trainer, batch, 4)
    lc = cfg.loss

    def loss_of(pol, ref):
        loss, _ = configured_loss(lc, LossInputs(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1]))
        return float(loss)

    expected = np.mean([loss_of(p, r) for p, r in micro])
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    whole = loss_of(jnp.concatenate([p for p, _ in micro]), jnp.concatenate([r for _, r in micro]))
    assert abs(whole - expected) > 1e-4  # the normalisation really is per micro-batch


@pytest.mark.slow
def test_one_compile_per_bucket(train_data, tmp_path):
    """Batches of the demo data in two bucket lengths compile the step exactly twice. The
    first 12 batches of the epoch (7 of 128 tokens, 5 of 64, interleaved) stand for the
    whole epoch: once each shape has been seen, a later batch of either costs no compile."""
    cfg = load_config("configs/tiny.yaml", [
        "data.max_length=128", "data.max_prompt_length=64", "data.batch_size=64", "mesh.data=1",
        "model.init.num_hidden_layers=1", "model.init.hidden_size=32", "model.init.intermediate_size=32",
        f"train.output_dir={tmp_path}",
    ])
    data = load_preference_data(cfg.data, "train")
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    batches = train_batches(data, cfg.data.batch_size, cfg.data.seed)
    steps = min(len(data) // cfg.data.batch_size, 12)
    buckets = bucket_lengths(cfg.data.max_length, SMALLEST_BUCKET)
    shapes = set()
    state = trainer.state
    for step in range(steps):
        host = batches[step]
        shapes.add(host.input_ids.shape)
        assert host.input_ids.shape[2] == bucket_for(int(host.attention_mask.sum(-1).max()), buckets)
        state, _ = trainer.train_step(state, device_batch(host, trainer.mesh))
    jax.block_until_ready(state)
    assert len(shapes) == 2, shapes
    assert trainer.train_step._cache_size() == len(shapes)
