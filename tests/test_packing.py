"""`data.packing: packed`: the layout of packed batches checked against the padded one
built by `collate` (an independent construction), and the train and eval steps on packed
batches against the same steps on padded batches (tiny model, float32)."""

import jax
import numpy as np
import pytest

from mmpo_jax.config import load_config
from mmpo_jax.data.batches import PackSpec, computed_tokens, eval_batches, real_tokens, train_batches
from mmpo_jax.data.packing import first_fit, pack_plan, row_buckets
from mmpo_jax.data.pipeline import load_preference_data
from mmpo_jax.config_schema import ConfigError
from mmpo_jax.train.setup import build_trainer, device_batch

from step_compare import assert_same_history

STEPS = 5
BASE = ["optim.learning_rate=3e-3", "optim.warmup_steps=0", "train.max_steps=10"]


@pytest.fixture(scope="module")
def data():
    return load_preference_data(load_config("configs/tiny.yaml").data, "train")


def test_row_buckets_and_first_fit():
    assert row_buckets(1) == (1,)
    assert row_buckets(8) == (1, 2, 3, 4, 6, 8)
    assert row_buckets(20) == (1, 2, 3, 4, 6, 8, 12, 16, 20)
    rows = first_fit([60, 50, 40, 30, 20, 10], 100)
    assert rows == [[0, 2], [1, 3, 4], [5]]  # longest first, each into the first row with room
    assert sorted(i for r in rows for i in r) == list(range(6))
    with pytest.raises(ValueError, match="101 tokens"):
        first_fit([101], 100)


def test_plan_keeps_each_block_on_its_own_rows():
    tokens = np.array([90, 10, 80, 20, 70, 30, 60, 40, 0, 0, 50, 50])  # two padding pairs
    plan = pack_plan(tokens, shards=2, micro=3, pack_length=100)
    assert plan.blocks == 6 and plan.pairs_per_block == 2
    for b in range(plan.blocks):
        pairs = plan.block_pairs(b)
        d, a = divmod(b, 3)
        assert list(pairs) == [d * 6 + a, d * 6 + a + 3]  # the step's strided micro-batches
        slots = [k for row in plan.block_rows[b] for k in row]
        assert sorted(slots) == [k for k in range(2) if tokens[pairs[k]] > 0]
        for row in plan.block_rows[b]:
            assert sum(tokens[pairs[k]] for k in row) <= 100
    assert plan.rows_per_block == 2  # block 0: 90 + 20 > 100 needs two rows; the others one


@pytest.mark.parametrize("shards,micro", [(1, 1), (2, 2), (4, 1)])
def test_packed_rows_hold_exactly_the_padded_sequences(data, shards, micro):
    """Gathering each micro-batch's rows by `token_index` gives back `collate`'s padded
    ids; positions restart per sequence; a sequence is one segment, distinct from the
    other sequences of its row; a pair's tokens stay in its device's rows."""
    spec = PackSpec(pack_length=128, shards=shards, micro=micro, width=64)
    padded = train_batches(data, 8, 0, process_index=0, process_count=1)
    packed = train_batches(data, 8, 0, process_index=0, process_count=1, packing=spec)
    for step in range(3):
        want, got = padded[step], packed[step]
        assert real_tokens(got) == real_tokens(want)
        assert computed_tokens(got) <= computed_tokens(want)  # the tiny rows fill most of a row pair
        seq = want.input_ids.shape[-1]
        np.testing.assert_array_equal(got.loss_mask[..., :seq], want.loss_mask)
        assert not got.loss_mask[..., seq:].any()
        np.testing.assert_array_equal(got.example_index, want.example_index)
        rows_per_block = got.input_ids.shape[0] // (shards * micro)
        for a in range(micro):
            rows = [x[a::micro] for x in (got.input_ids, got.positions, got.segment_ids)]
            index = got.token_index[a::micro]
            real = got.attention_mask[a::micro] == 1
            ids, positions, segments = (x.reshape(-1)[index] for x in rows)
            np.testing.assert_array_equal(np.where(real, ids, -1)[..., :seq],
                                          np.where(want.attention_mask[a::micro] == 1, want.input_ids[a::micro], -1))
            lengths = real.sum(-1)
            assert (np.where(real, positions, 0) == np.where(real, np.arange(64), 0)).all()
            for q in range(index.shape[0]):
                device = q // (index.shape[0] // shards)
                row_of = index[q][real[q]] // 128
                assert set(row_of.tolist()) <= set(range(device * rows_per_block, (device + 1) * rows_per_block))
                assert len(set(row_of.tolist())) == 1  # both sequences of a pair share one row
                for k in (0, 1):
                    seg = segments[q, k, : lengths[q, k]]
                    assert (seg == seg[0]).all() and seg[0] > 0
                assert segments[q, 0, 0] != segments[q, 1, 0]
        # every token of a row not in a sequence is padding, segment 0
        assert (got.segment_ids > 0).sum() == real_tokens(got)
        assert (got.input_ids[got.segment_ids == 0] == data.special.pad).all()


def test_pack_length_below_the_longest_pair_stops_at_start():
    with pytest.raises(ConfigError, match=r"pack_length=100.*128 tokens"):
        load_config("configs/tiny.yaml", ["data.packing=packed", "data.pack_length=100"])
    assert load_config("configs/tiny.yaml", ["data.packing=packed"]).data.pack_length == 128


def _history(overrides, data, devices, steps=STEPS):
    cfg = load_config("configs/tiny.yaml", BASE + overrides)
    trainer = build_trainer(cfg, devices=devices)
    batches = train_batches(data, cfg.data.batch_size, cfg.data.seed, packing=trainer.packing)
    state, history = trainer.state, []
    for step in range(steps):
        state, metrics = trainer.train_step(state, device_batch(batches[step], trainer.mesh))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    evals = []
    for b in range(2):
        batch = eval_batches(data, cfg.data.batch_size, packing=trainer.packing)[b]
        evals.append({k: float(v) for k, v in jax.device_get(trainer.eval_step(state, device_batch(batch, trainer.mesh))).items()})
    return history, evals


@pytest.mark.parametrize("overrides,devices", [
    (["loss.name=mmpo", "mesh.data=2", "mesh.fsdp=2", "optim.grad_accum=2"], 4),
    (["loss.name=dpo", "model.lora.rank=4", "optim.learning_rate=1e-2", "mesh.data=1"], 1),
    (["loss.name=simpo", "mesh.data=1"], 1),
], ids=["mmpo-full-2x2-accum2", "dpo-lora", "simpo-full"])
def test_packed_training_equals_padded(data, overrides, devices):
    """5 steps and then an eval on packed batches equal the same on padded batches
    (benchmarks/packing_exactness.py runs every loss x LoRA/full)."""
    devs = jax.devices()[:devices]
    want_train, want_eval = _history(overrides, data, devs)
    got_train, got_eval = _history(overrides + ["data.packing=packed"], data, devs)
    assert abs(want_train[-1]["rewards/margins"]) > 1e-4  # the policy moved: the steps mean something
    assert_same_history(got_train, want_train, f"packed {overrides}")
    assert_same_history(got_eval, want_eval, f"packed eval {overrides}")
