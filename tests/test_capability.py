"""The capability probe run with a model (`mmpo_jax.eval.capability`, `mmpo-jax eval --capability`).

The scoring rules themselves (`choice_correct`, `score_probe`) are tested in
tests/test_demo_data.py; here: the batched, bucketed log-likelihoods against an
unbatched full-logits computation, the bookkeeping from rows to items, and the CLI.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.eval import capability as cap
from mmpo_jax.buckets import bucket_for, bucket_lengths
from mmpo_jax.data.probe import (ProbeItem, chat_request, encode_request, load_probe, plain_request,
                                 score_probe)
from mmpo_jax.errors import UserError

ROOT_CONFIG = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def tok():
    from mmpo_jax.data.tokenizers import load_tokenizer

    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="module")
def trainer():
    from mmpo_jax.config import load_config
    from mmpo_jax.train.setup import build_trainer

    # 8 simulated devices (conftest): the probe's rows are split over the data axis
    return build_trainer(load_config(ROOT_CONFIG, ["train.output_dir=/nonexistent-not-written"]))


# --------------------------------------------------------------------------- #
# Pure helpers
# --------------------------------------------------------------------------- #
def test_truncate_left_keeps_the_continuation():
    assert cap.truncate_left([1, 2, 3], [4, 5], 10) == ([1, 2, 3, 4, 5], 2)
    assert cap.truncate_left([1, 2, 3], [4, 5], 3) == ([3, 4, 5], 2)  # oldest context tokens go
    with pytest.raises(UserError, match="item q7: the option has 3 tokens.*3-token window"):
        cap.truncate_left([1], [4, 5, 6], 3, "item q7")
    with pytest.raises(UserError, match="no tokens"):
        cap.truncate_left([1], [], 3)


def test_buckets():
    assert bucket_lengths(2048, cap.SMALLEST_BUCKET) == (32, 64, 128, 256, 512, 1024, 2048)
    assert bucket_lengths(100, cap.SMALLEST_BUCKET) == (32, 64, 100)
    assert bucket_lengths(20, cap.SMALLEST_BUCKET) == (20,)
    assert [bucket_for(n, (32, 64, 100)) for n in (1, 32, 33, 100)] == [32, 32, 64, 100]
    with pytest.raises(ValueError, match="101 tokens"):
        bucket_for(101, (32, 64, 100))


def test_rows_to_items_bookkeeping_with_hand_made_loglikelihoods(tok):
    """A stand-in model whose log-likelihood of a row is minus its continuation tokens:
    the values must come back per item in option order (whatever bucket and batch each
    row went to) and be scored as LM-harness defines acc and acc_norm."""
    items = [
        ProbeItem("a", "x", "Which is short?", ("a", "a much longer option here"), 1),
        ProbeItem("b", "x", "Which is long? " * 6, ("yes", "no", "a rather long answer"), 0),
        ProbeItem("c", "y", "Pick one.", ("zebra crossing ahead", "q"), 0),
    ]
    rows = cap.probe_rows(items, tok, max_length=64)
    assert [(r.item, r.option) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    seen_shapes = []

    def fake(ids, mask):
        seen_shapes.append(ids.shape)
        assert ids.dtype == np.int32 and mask.shape == ids.shape
        return -mask.sum(axis=1)

    values = cap.continuation_loglikelihoods(fake, rows, rows_per_batch=2, buckets=(8, 16, 64))
    assert len({s[1] for s in seen_shapes}) >= 2 and all(s[0] == 2 for s in seen_shapes)
    lls = cap.regroup(items, rows, values)
    want = []
    for item in items:
        context, conts = plain_request(item)
        want.append([-float(len(encode_request(tok, context, c)[1])) for c in conts])
    assert lls == want
    # LM-harness: acc = argmax ll, acc_norm = argmax ll / len(option characters), per item
    result = cap.flat_metrics(score_probe(items, lls))
    acc = [int(np.argmax(ll)) == it.answer for ll, it in zip(want, items)]
    acc_norm = [int(np.argmax(np.array(ll) / [len(o) for o in it.options])) == it.answer
                for ll, it in zip(want, items)]
    assert result["capability/acc"] == pytest.approx(np.mean(acc))
    assert result["capability/acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert result["capability/x/n"] == 2 and result["capability/y/n"] == 1
    assert result["capability/chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert acc != acc_norm  # the items tell the two apart


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #
def _full_logits_fn(model, pad_to):
    """`ids [T] -> log_softmax(logits) [T, V]` from the model's full forward (no chunking,
    no masks), one row at a time. The row is right-padded to `pad_to` so that one compile
    serves every length (the model is causal: positions < T never see the padding; the
    test checks that once against an unpadded forward)."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, ids):
        m = nnx.merge(graphdef, state)
        logits = jnp.einsum("btd,dv->btv", m(ids), m.lm_head_kernel(), preferred_element_type=jnp.float32)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[0]

    def run(ids):
        n = len(ids)
        padded = list(ids) + [0] * (max(pad_to, n) - n)
        return np.asarray(f(state, jnp.asarray(padded, jnp.int32)[None]), np.float64)[:n]

    return run


def _independent_loglik(logp_fn, context_ids, cont_ids, max_length):
    ids = (list(context_ids) + list(cont_ids))[-max_length:]
    logp = logp_fn(ids)  # logp[t] is the distribution of token t + 1
    start = len(ids) - len(cont_ids)
    return sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))


def test_batched_loglikelihood_equals_unbatched_full_logits(trainer, tok):
    """Items of different lengths, plain and chat prompts, padded into several buckets
    (with a chunk that divides none of them) and left-truncated where too long: each
    continuation's log-likelihood equals the sum over just its tokens of the full
    forward's log_softmax, one unpadded row at a time."""
    probe = load_probe()
    items = [probe[0], probe[50], probe[120], probe[200],
             ProbeItem("long", "z", "Count the words in this sentence please " * 4, ("three", "many"), 1)]
    max_length = 40
    buckets = (12, 20, 28, 40)
    model = cap.probe_model(trainer, "policy")
    loglik = cap.loglik_function(model, trainer.mesh, chunk=16)
    logp_fn = _full_logits_fn(model, max_length)
    context, conts = plain_request(items[0])
    row = sum(encode_request(tok, context, conts[0]), [])
    # the independent forward's padding changes nothing (causal model): padded == unpadded
    np.testing.assert_allclose(logp_fn(row), _full_logits_fn(model, 0)(row), rtol=0, atol=1e-5)
    for template in ("plain", "chat"):
        rows = cap.probe_rows(items, tok, max_length=max_length, template=template)
        assert len({bucket_for(len(r.ids), buckets) for r in rows}) >= 2
        assert any(len(r.ids) == max_length for r in rows)  # the long item is cut
        got = cap.regroup(items, rows, cap.continuation_loglikelihoods(
            loglik, rows, rows_per_batch=8, buckets=buckets))
        for item, values in zip(items, got):
            if template == "plain":
                context, conts = plain_request(item)
            else:
                context, conts = chat_request(item, tok)
            for option, cont in enumerate(conts):
                ctx_ids, cont_ids = encode_request(tok, context, cont, add_special_tokens=template == "plain")
                want = _independent_loglik(logp_fn, ctx_ids, cont_ids, max_length)
                assert values[option] == pytest.approx(want, rel=1e-5, abs=1e-4), (template, item.id, option)


def test_probe_accuracy_scores_the_policy_and_reference(trainer, tok):
    items = load_probe()[:12]
    result = cap.probe_accuracy(trainer, tok, items, max_length=64)
    assert result["n"] == 12 and 0.0 <= result["acc"] <= 1.0 and set(result["by_category"])
    # at init the separate reference is a copy of the policy: the same scores
    assert cap.probe_accuracy(trainer, tok, items, which="reference", max_length=64) == result


def test_probe_of_a_precomputed_run_loads_its_initial_weights():
    """`precomputed` keeps only log-probs in the state: the probe's reference is the
    initial model loaded again from the config, whatever the policy became (a trainer
    built anew from the same config is the independent copy of those weights)."""
    import dataclasses

    from flax import nnx

    from mmpo_jax.config import load_config
    from mmpo_jax.train.setup import build_trainer

    cfg = load_config(ROOT_CONFIG, ["train.output_dir=/nonexistent-not-written", "model.reference=precomputed"])
    fresh = build_trainer(cfg)
    initial = jax.device_get(nnx.state(fresh.sdef.policy(fresh.state), nnx.Param))
    state = fresh.state
    moved = dataclasses.replace(fresh, state=state.replace(trainable=jax.tree.map(lambda x: x * 0.5, state.trainable)))
    reference = jax.device_get(nnx.state(cap.probe_model(moved, "reference"), nnx.Param))
    policy = jax.device_get(nnx.state(cap.probe_model(moved, "policy"), nnx.Param))
    assert jax.tree.all(jax.tree.map(np.array_equal, reference, initial))
    assert not jax.tree.all(jax.tree.map(np.array_equal, policy, initial))  # the policy did move


def test_probe_of_a_run_without_reference_says_so():
    from mmpo_jax.train.reference import REFERENCE_MODES

    class _Sdef:
        reference_mode = REFERENCE_MODES["none"]

    class _Trainer:
        sdef = _Sdef()
        state = None

    with pytest.raises(UserError, match="model.reference=none.*no reference model"):
        cap.probe_model(_Trainer(), "reference")


def test_eval_cli_prints_capability_keys(capsys):
    from mmpo_jax.cli import main

    assert main(["eval", ROOT_CONFIG, "--capability", "--json", "--capability-limit", "40",
                 "train.eval_batches=1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"capability/acc", "capability/acc_norm", "capability/chance", "eval/loss"} <= set(out)
    assert out["capability/n"] == 40
    assert any(k.endswith("/acc_norm") and k.count("/") == 2 for k in out)  # per category
    assert main(["eval", ROOT_CONFIG, "--capability-reference"]) == 2
    assert "needs --capability" in capsys.readouterr().err


def test_the_three_bucket_users_keep_their_lengths():
    """One helper, each user's own smallest bucket: the train batches from 16, the probe
    from 32, generation's prompts from 16 with no cap (the lengths they had before)."""
    from mmpo_jax.data import batches
    from mmpo_jax.eval.generate import prompt_bucket

    assert bucket_lengths(1024, batches.SMALLEST_BUCKET) == (16, 32, 64, 128, 256, 512, 1024)
    assert bucket_lengths(48, batches.SMALLEST_BUCKET) == (16, 32, 48)
    assert bucket_lengths(16, batches.SMALLEST_BUCKET) == (16,)
    assert [prompt_bucket(n) for n in (1, 16, 17, 100, 5000)] == [16, 16, 32, 128, 8192]
