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
from mmpo_jax.data.layout import PACKED, SHARED_PROMPT, device_batch
from mmpo_jax.train.setup import build_trainer

from step_compare import assert_same_history

STEPS = 5
BASE = ["optim.learning_rate=3e-3", "optim.warmup_steps=0", "train.max_steps=10"]


@pytest.fixture(scope="module")
def data():
    return load_preference_data(load_config("configs/tiny.yaml").data, "train")


def test_row_buckets_and_first_fit():
    assert row_buckets(1) == (1,)
    assert row_buckets(8) == (1, 2, 3, 4, 5, 6, 7, 8)
    assert row_buckets(40) == (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 40)
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
    # unused without packing: a run saved before packing existed compares equal
    assert load_config("configs/tiny.yaml").data.pack_length is None


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


@pytest.mark.slow
@pytest.mark.parametrize("overrides,devices,layout", [
    (["loss.name=mmpo", "mesh.data=2", "mesh.fsdp=2", "optim.grad_accum=2"], 4, "packed"),
    (["loss.name=dpo", "model.lora.rank=4", "optim.learning_rate=1e-2", "mesh.data=1"], 1, "packed"),
    (["loss.name=simpo", "mesh.data=1"], 1, "packed"),
    (["loss.name=mmpo", "mesh.data=2", "mesh.fsdp=2", "optim.grad_accum=2"], 4, "shared_prompt"),
    (["loss.name=simpo", "model.lora.rank=4", "optim.learning_rate=1e-2", "mesh.data=1"], 1, "shared_prompt"),
], ids=["mmpo-full-2x2-accum2", "dpo-lora", "simpo-full", "shared-mmpo-full-2x2-accum2", "shared-simpo-lora"])
def test_packed_training_equals_padded(data, overrides, devices, layout):
    """5 steps and then an eval on packed (or shared-prompt) batches equal the same on
    padded batches (benchmarks/packing_exactness.py runs every loss x LoRA/full)."""
    devs = jax.devices()[:devices]
    want_train, want_eval = _history(overrides, data, devs)
    got_train, got_eval = _history(overrides + [f"data.packing={layout}"], data, devs)
    assert abs(want_train[-1]["rewards/margins"]) > 1e-4  # the policy moved: the steps mean something
    assert_same_history(got_train, want_train, f"packed {overrides}")
    assert_same_history(got_eval, want_eval, f"packed eval {overrides}")


@pytest.mark.slow
def test_packed_training_through_the_pallas_gpu_kernel_equals_padded_xla(data):
    """The Pallas GPU kernel (interpreted here) on packed rows, in shard_map over two
    devices, trains as XLA attention on padded rows does."""
    devs, base = jax.devices()[:2], ["loss.name=dpo", "mesh.data=2"]
    want_train, want_eval = _history(base, data, devs, steps=3)
    got_train, got_eval = _history(base + ["data.packing=packed", "model.attention=pallas_gpu"], data, devs,
                                   steps=3)
    assert_same_history(got_train, want_train, "packed pallas_gpu")
    assert_same_history(got_eval, want_eval, "packed pallas_gpu eval")


def assert_same_pair_outputs(outputs, got_batch, want_batch):
    """`outputs(batch, **kw)` (the leaves of `pair_logps`) equal on both batches for every
    per-pair output the losses read: sequence log-probs summed and averaged, both entropy
    estimators, LD-DPO's weights, WPO's weights, ORPO's whole-row NLL."""
    for kw in (dict(average=False, entropy_estimator="score_function", chosen_sequence=True, weighting=True),
               dict(average=True, entropy_estimator="token"),
               dict(average=False, ld_alpha=0.5)):
        want, got = outputs(want_batch, **kw), outputs(got_batch, **kw)
        assert len(want) == len(got) >= 2
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(kw))


@pytest.mark.slow
def test_packed_log_probs_equal_padded_ones_and_a_wrong_mask_is_caught(data):
    """Every per-pair output the losses read (sequence log-probs summed and averaged,
    both entropy estimators, LD-DPO's weights, WPO's weights, ORPO's whole-row NLL) from
    packed rows equals the padded layout's; packed rows whose tokens see the other
    sequences of their row (one segment per row) give other log-probs."""
    import jax.numpy as jnp

    from mmpo_jax.train.pair_logps import pair_logps

    # weights large enough that a token's log-prob depends on its context
    cfg = load_config("configs/tiny.yaml", ["mesh.data=1", "model.init.init_scale=0.3"])
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    model = trainer.sdef.policy(trainer.state)
    spec = PackSpec(pack_length=128, shards=1, micro=1, width=64)
    padded = device_batch(train_batches(data, 8, 0, process_index=0, process_count=1)[0], trainer.mesh)
    packed = device_batch(train_batches(data, 8, 0, process_index=0, process_count=1, packing=spec)[0],
                          trainer.mesh)

    def outputs(batch, **kw):
        return [np.asarray(x) for x in jax.tree.leaves(pair_logps(model, batch, chunk=32, **kw))]

    assert_same_pair_outputs(outputs, packed, padded)
    logps = outputs(packed, average=False)[0]
    # (positions that run on across a row would not be caught: RoPE sees only offsets
    # within a segment, which a constant shift keeps)
    one_segment = packed.replace(segment_ids=jnp.where(packed.segment_ids > 0, 1, 0))
    assert np.abs(outputs(one_segment, average=False)[0] - logps).max() > 1.0


def test_inspect_data_reports_real_and_computed_tokens_of_each_layout(data, capsys, tmp_path):
    """`inspect-data`'s real and computed tokens equal the sums over the epoch's own
    batches (built by `train_batches`, not by the plan), for both layouts."""
    import json

    from mmpo_jax import cli
    from mmpo_jax.data.batches import steps_per_epoch

    per_epoch = steps_per_epoch(len(data), 8)
    spec = PackSpec(pack_length=128, shards=1, micro=1, width=64)
    reports = {}
    for packing in ("none", "packed"):
        code = cli.main(["inspect-data", "configs/tiny.yaml", f"data.packing={packing}", "--json"])
        assert code == 0
        reports[packing] = json.loads(capsys.readouterr().out)["train"]["batches"]
        built = train_batches(data, 8, 0, process_index=0, process_count=1,
                              packing=spec if packing == "packed" else None)
        batches = [built[s] for s in range(per_epoch)]
        assert reports[packing]["real_tokens"] == sum(real_tokens(b) for b in batches)
        assert reports[packing]["computed_tokens"] == sum(computed_tokens(b) for b in batches)
    assert reports["none"]["real_tokens"] == reports["packed"]["real_tokens"]
    rows = reports["packed"]["steps_per_row_count"]
    assert sum(rows.values()) == per_epoch and len(rows) <= 8
    cli.main(["inspect-data", "configs/tiny.yaml", "data.packing=packed"])
    out = capsys.readouterr().out
    assert "data.packing=packed: packed into rows of 128 tokens" in out and "fill 0." in out


@pytest.mark.slow
def test_precomputed_reference_table_is_the_same_from_packed_batches():
    """`model.reference=precomputed`: the table of reference log-probs computed over
    packed eval batches (the last one part padding) equals the padded layout's."""
    from mmpo_jax.train.reference_cache import compute_table
    from mmpo_jax.train.setup import initial_reference

    tables = []
    for packing in ("none", "packed"):
        cfg = load_config("configs/tiny.yaml", ["mesh.data=2", "model.reference=precomputed",
                                                 "model.init.init_scale=0.3", f"data.packing={packing}"])
        test = load_preference_data(cfg.data, "test")
        assert len(test) % cfg.data.batch_size  # a last batch with padding pairs
        trainer = build_trainer(cfg, devices=jax.devices()[:2])
        tables.append(compute_table(cfg, initial_reference(trainer), test, trainer.mesh))
    assert np.all(tables[0] < 0)
    np.testing.assert_allclose(tables[1], tables[0], rtol=1e-5)


@pytest.mark.slow
def test_layout_flops_benchmark_on_a_tiny_shape(tmp_path, capsys):
    """benchmarks/layout_flops.py end to end on the tiny shape: XLA's count of the padded
    step within 5% of the analytic one (the script's own check), packing computing fewer
    tokens and FLOPs on uneven lengths, and the padded tokens per real token as counted
    here by hand from the lengths."""
    import json
    import sys

    sys.path.insert(0, "benchmarks")
    import layout_flops

    rng = np.random.default_rng(0)
    rows = [{"prompt": int(rng.integers(4, 24)), "chosen": int(rng.integers(2, 40)),
             "rejected": int(rng.integers(2, 40))} for _ in range(16)]
    lengths = tmp_path / "lengths.jsonl"
    lengths.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = layout_flops.main(["--lengths", str(lengths), "--model", "tiny", "--max-length", "64",
                             "--max-prompt-length", "32", "--pairs", "16", "--compute-dtype", "float32"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert abs(out["none_vs_analytic"]) <= 0.05
    assert out["ratio"] < 1 and out["packed_computed_per_real_token"] < out["none_computed_per_real_token"]
    padded = real = 0
    for start in (0, 8):
        part = rows[start:start + 8]
        p = [min(r["prompt"], 32) for r in part]
        c = [min(r["chosen"], 64 - q) for r, q in zip(part, p)]
        j = [min(r["rejected"], 64 - q) for r, q in zip(part, p)]
        longest = max(q + max(a, b) for q, a, b in zip(p, c, j))
        padded += 16 * next(b for b in (16, 32, 64) if b >= longest)
        real += sum(2 * q + a + b for q, a, b in zip(p, c, j))
    assert out["none_computed_per_real_token"] == pytest.approx(padded / real)
    # sharing the prompt computes fewer tokens again
    assert out["shared_prompt_computed_per_real_token"] < out["packed_computed_per_real_token"]
    assert out["shared_prompt_ratio"] < out["ratio"]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_two_processes_build_the_halves_of_one_packed_batch(data, split):
    """Each of 2 processes builds only its own shards' rows and pairs; side by side they
    are the one-process batch (the global arrays `make_array_from_process_local_data`
    assembles), the row count agreed without talking."""
    spec = PackSpec(pack_length=128, shards=4, micro=2 if split == "train" else 1, width=64)

    def batch(index, count):
        if split == "train":
            return train_batches(data, 8, 0, process_index=index, process_count=count, packing=spec)[3]
        return eval_batches(data, 8, process_index=index, process_count=count, packing=spec)[len(data) // 8]

    whole, halves = batch(0, 1), [batch(i, 2) for i in (0, 1)]
    for key in ("input_ids", "segment_ids", "positions", "token_index", "attention_mask", "loss_mask",
                "pair_mask", "example_index"):
        np.testing.assert_array_equal(np.concatenate([getattr(h, key) for h in halves]), getattr(whole, key),
                                      err_msg=key)
    if split == "eval":
        assert 0 < whole.pair_mask.sum() < 8  # the last eval batch: padding pairs too


# --------------------------------------------------------------------------- #
# data.packing: shared_prompt
# --------------------------------------------------------------------------- #
# (prompt, chosen, rejected) lengths that stress the layout: one-token answers, prompts
# longer than both answers, a one-token prompt, an answer far longer than the prompt
CRAFTED = [(40, 1, 1), (1, 1, 30), (30, 5, 2), (50, 1, 13), (2, 30, 1), (20, 10, 10), (35, 3, 29), (12, 12, 12)]


def _crafted(shared, shards=1):
    """The crafted pairs padded by `collate` (the reference) and packed (or shared)."""
    from mmpo_jax.data.batches import collate
    from mmpo_jax.data.packing import collate_packed, row_tokens

    rng = np.random.default_rng(7)
    pairs = [tuple(rng.integers(3, 2048, n).tolist() for n in lens) for lens in CRAFTED]
    padded = collate(pairs, np.arange(8), 64, 0)
    plan = pack_plan(row_tokens(np.array(CRAFTED), shared), shards, 1, 128)
    return padded, collate_packed(plan, pairs, np.arange(8), 0, 128, 64, 0, SHARED_PROMPT if shared else PACKED)


def test_shared_prompt_rows_hold_the_padded_sequences_with_one_prompt(data):
    padded, got = _crafted(shared=True)
    _, packed = _crafted(shared=False)
    real = got.attention_mask == 1
    index = got.token_index
    ids, positions, branches = (x.reshape(-1)[index] for x in (got.input_ids, got.positions, got.branches))
    np.testing.assert_array_equal(np.where(real, ids, -1), np.where(padded.attention_mask == 1, padded.input_ids, -1))
    assert (np.where(real, positions, 0) == np.where(real, np.arange(64), 0)).all()  # the unpacked positions
    np.testing.assert_array_equal(got.loss_mask, padded.loss_mask)
    assert real_tokens(got) == real_tokens(padded) == real_tokens(packed)
    tokens = np.array(CRAFTED)
    assert (got.segment_ids > 0).sum() == tokens.sum()  # each prompt once: p + c + r per pair
    assert computed_tokens(got) < computed_tokens(packed)
    for q, (p, c, r) in enumerate(CRAFTED):
        np.testing.assert_array_equal(index[q, 0, :p], index[q, 1, :p])  # one prompt serves both
        assert (branches[q, 0, :p] == 0).all() and (branches[q, 1, :p] == 0).all()
        assert (branches[q, 0, p:p + c] == 1).all() and (branches[q, 1, p:p + r] == 2).all()
        # the rejected answer's first token is predicted from the prompt's last, not the
        # chosen answer's last token before it in the row
        first = index[q, 1, p] % 128
        assert got.sources.reshape(-1)[index[q, 1, p]] == index[q, 0, p - 1] % 128 != first - 1
    # the same pairs in the same rows from a second shard split: still a function of the pairs
    assert _crafted(shared=True, shards=2)[1].input_ids.shape[0] >= 2


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_crafted_pairs_log_probs_and_a_step_equal_padded(layout):
    """On pairs of every length shape (CRAFTED): every per-pair output the losses read and
    one DPO step (loss, log-probs, rewards, grad norm) equal the padded layout's; for
    shared_prompt, a mask that lets the rejected answer see the chosen one, or the row's
    one-step shift in place of the explicit sources, gives other log-probs."""
    import jax.numpy as jnp

    from mmpo_jax.train.pair_logps import pair_logps

    base = ["mesh.data=1", "model.init.init_scale=0.3", "loss.name=dpo", "optim.warmup_steps=0"]
    # the same initial weights (seeded); each step compiled for its own layout
    trainers = [build_trainer(load_config("configs/tiny.yaml", base + more), devices=jax.devices()[:1])
                for more in ([f"data.packing={layout}", "data.pack_length=128"], [])]
    model = trainers[1].sdef.policy(trainers[1].state)
    host_padded, host_packed = _crafted(shared=layout == "shared_prompt")
    padded, packed = (device_batch(b, trainers[1].mesh) for b in (host_padded, host_packed))

    def outputs(batch, **kw):
        return [np.asarray(x) for x in jax.tree.leaves(pair_logps(model, batch, chunk=32, **kw))]

    assert_same_pair_outputs(outputs, packed, padded)
    if layout == "shared_prompt":
        logps = outputs(packed, average=False)[0]
        sees_chosen = packed.replace(branches=jnp.zeros_like(packed.branches))
        cols = jnp.arange(128)
        shifted = packed.replace(sources=jnp.broadcast_to(jnp.maximum(cols - 1, 0), packed.sources.shape))
        for wrong in (sees_chosen, shifted):
            bad = outputs(wrong, average=False)[0]
            assert np.abs(bad[:, 1] - logps[:, 1]).max() > 1e-2  # the rejected answers move
            np.testing.assert_allclose(bad[:, 0], logps[:, 0], rtol=1e-5)  # the chosen ones do not
    # last: a step donates the state the model above reads
    steps = [t.train_step(t.state, b)[1] for t, b in zip(trainers, (packed, padded))]
    got, want = ({k: float(v) for k, v in jax.device_get(m).items()} for m in steps)
    assert_same_history([got], [want], f"{layout} crafted step")
