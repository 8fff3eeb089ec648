"""Chunked log-probs and entropies: equal to the naive full-logits path in value and
gradient, float32 whatever the input dtype, and the shift agrees with transformers."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.logprobs import (
    model_token_logps,
    sequence_logps,
    shifted_token_logps,
    token_logps_chunked,
    token_logps_naive,
)

REL = 1e-5


def _inputs(b=3, t=37, d=16, v=50, seed=0, scale=2.0):
    k = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(k[0], (b, t, d))
    kernel = scale * jax.random.normal(k[1], (d, v)) / np.sqrt(d) * 3
    targets = jax.random.randint(k[2], (b, t), 0, v)
    w_lp = jax.random.normal(k[3], (b, t))
    w_ent = jax.random.normal(k[4], (b, t))
    return hidden, kernel, targets, w_lp, w_ent


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# 8 does not divide T=37; 64 > T: one chunk; a final-logit soft-cap (Gemma 2's) of 3,
# below the logits' range, so its tanh bends them (the naive path differentiates it by autodiff)
@pytest.mark.parametrize("chunk,soft_cap", [(8, None), (64, None), (8, 3.0)])
def test_chunked_equals_naive_value_and_grad(chunk, soft_cap):
    hidden, kernel, targets, w_lp, w_ent = _inputs()
    if soft_cap is not None:
        assert float(jnp.max(jnp.abs(hidden @ kernel))) > 2 * soft_cap

    def objective(fn, h, k):
        lp, ent = fn(h, k, targets, with_entropy=True, soft_cap=soft_cap)
        return jnp.sum(lp * w_lp) + jnp.sum(ent * w_ent), (lp, ent)

    naive = jax.value_and_grad(partial(objective, token_logps_naive), argnums=(0, 1), has_aux=True)
    chunked = jax.value_and_grad(
        partial(objective, partial(token_logps_chunked, chunk=chunk)), argnums=(0, 1), has_aux=True
    )
    (_, (lp_n, ent_n)), g_n = jax.jit(naive)(hidden, kernel)
    (_, (lp_c, ent_c)), g_c = jax.jit(chunked)(hidden, kernel)
    assert lp_c.shape == ent_c.shape == targets.shape
    assert _rel(lp_c, lp_n) < REL
    assert _rel(ent_c, ent_n) < REL
    assert _rel(g_c[0], g_n[0]) < REL
    assert _rel(g_c[1], g_n[1]) < REL
    # far from uniform: the entropies are well below log V
    assert float(jnp.mean(ent_n)) < np.log(kernel.shape[1]) - (0.2 if soft_cap else 1)
    if soft_cap is not None:  # the cap changed the values: the check above is of the capped path
        assert _rel(lp_c, token_logps_naive(hidden, kernel, targets)) > 1e-2


def test_logps_only_gradient_matches():
    hidden, kernel, targets, w_lp, _ = _inputs(t=20, seed=1)

    def f(fn, h, k):
        return jnp.sum(fn(h, k, targets) * w_lp)

    g_n = jax.grad(partial(f, token_logps_naive), argnums=(0, 1))(hidden, kernel)
    g_c = jax.grad(partial(f, partial(token_logps_chunked, chunk=6)), argnums=(0, 1))(hidden, kernel)
    for a, b in zip(g_c, g_n):
        assert _rel(a, b) < REL


def test_values_are_log_softmax():
    hidden, kernel, targets, _, _ = _inputs(b=2, t=5)
    lp, ent = token_logps_chunked(hidden, kernel, targets, chunk=2, with_entropy=True)
    logits = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64), np.asarray(kernel, np.float64))
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), -np.sum(np.exp(logp) * logp, -1), rtol=1e-5, atol=1e-5)


def test_float32_whatever_the_input_dtype():
    hidden, kernel, targets, _, _ = _inputs()
    h16, k16 = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    lp, ent = token_logps_chunked(h16, k16, targets, chunk=8, with_entropy=True)
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    # same numbers as float32 math on the bf16-rounded inputs
    ref = token_logps_naive(h16.astype(jnp.float32), k16.astype(jnp.float32), targets)
    assert _rel(lp, ref) < 1e-5
    g = jax.grad(lambda h, k: jnp.sum(token_logps_chunked(h, k, targets, chunk=8)), argnums=(0, 1))(h16, k16)
    assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16


def test_no_full_logits_in_the_chunked_program():
    """No [B, T, V] buffer in the compiled forward+backward (the naive one has them)."""
    b, t, d, v = 2, 64, 8, 1000
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    k = jax.ShapeDtypeStruct((d, v), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def hlo(fn):
        g = jax.jit(jax.grad(lambda h, k, i: jnp.sum(fn(h, k, i)), argnums=(0, 1)))
        return g.lower(h, k, ids).compile().as_text()

    full = f"f32[{b},{t},{v}]"
    assert full in hlo(token_logps_naive)
    assert full not in hlo(partial(token_logps_chunked, chunk=16))


def test_sequence_logps():
    lp = jnp.array([[0.0, -1.0, -2.0, -3.0], [0.0, -0.5, -0.5, -9.0]])
    mask = jnp.array([[0, 1, 1, 0], [0, 1, 1, 1]])
    np.testing.assert_allclose(sequence_logps(lp, mask, average=False), [-3.0, -10.0])
    np.testing.assert_allclose(sequence_logps(lp, mask, average=True), [-1.5, -10.0 / 3])
    empty = sequence_logps(lp, jnp.zeros_like(mask), average=True)
    np.testing.assert_array_equal(empty, [0.0, 0.0])


def test_shift_convention():
    """logps[:, t] scores input_ids[:, t] from the hidden state at t - 1; 0 at t = 0."""
    hidden, kernel, _, _, _ = _inputs(b=2, t=9)
    ids = jax.random.randint(jax.random.key(3), (2, 9), 0, kernel.shape[1])
    lp, ent = shifted_token_logps(hidden, kernel, ids, chunk=4, with_entropy=True)
    direct, direct_ent = token_logps_naive(hidden[:, :-1], kernel, ids[:, 1:], with_entropy=True)
    np.testing.assert_array_equal(np.asarray(lp[:, 0]), 0.0)
    np.testing.assert_allclose(np.asarray(lp[:, 1:]), np.asarray(direct), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ent[:, 1:]), np.asarray(direct_ent), rtol=1e-6, atol=1e-6)
    naive = shifted_token_logps(hidden, kernel, ids, chunk=None)
    np.testing.assert_allclose(np.asarray(naive), np.asarray(lp), rtol=1e-6, atol=1e-6)


def test_model_shift_against_transformers():
    """Our model_token_logps on a real (tiny, random) transformers Llama: the same
    numbers as transformers' logits shifted the usual way (`logits[:, :-1]` score
    `input_ids[:, 1:]`), with right padding."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mmpo_jax.models.build import build_model
    from mmpo_jax.models.decoder_config import DecoderConfig
    from mmpo_jax.models.options import ModelOptions
    import transformers

    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    tmodel = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg.to_hf_dict()), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for p in tmodel.parameters():
            p.normal_(0.0, 0.3)
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    model = build_model(cfg, ModelOptions(), get_tensor=state.__getitem__)
    ids = np.array([[5, 9, 12, 33, 2, 7], [8, 1, 60, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        logits = tmodel(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:])[..., None])[..., 0]
    got = np.asarray(model_token_logps(model, jnp.asarray(ids, jnp.int32), chunk=4))
    real = mask[:, 1:].astype(bool)
    assert np.max(np.abs(got[:, 1:] - want.numpy())[real]) < 1e-5
    assert np.all(got[:, 0] == 0)
    seq = sequence_logps(got, mask * (np.arange(6) > 0), average=False)
    np.testing.assert_allclose(np.asarray(seq), (want.numpy() * real).sum(-1), rtol=1e-5, atol=1e-5)
