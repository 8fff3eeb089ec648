"""What the objectives do, checked against closed forms computed here in numpy.

- The contract's identity: with aux_weight=1, MMPO's loss is mean(-s_w) and its
  gradient is -1/N on every chosen log-prob and 0 on every rejected one, for any
  beta, epsilons and normalisation.
- Theorem 3.2 (aux_weight=0): dL/dpc = -sigmoid(s_w - s_l)/N, dL/dpr = -sigmoid(s_l - s_w)/N.
- No NaN or inf from degenerate inputs; a pair_mask equals dropping the pairs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.losses import mmpo as losses


def _np_scores(pc, pr, rc, rr, beta, reward_epsilon=1.0, rejected_epsilon=0.1, norm_eps=1e-6,
               normalize="minmax"):
    r_w = reward_epsilon + beta * rc
    r_l = rejected_epsilon + beta * rr
    if normalize == "minmax":
        both = np.concatenate([r_w, r_l])
        lo, hi = both.min(), both.max()
        r_w = (r_w + norm_eps - lo) / (hi - lo + norm_eps)
        r_l = (r_l + norm_eps - lo) / (hi - lo + norm_eps)
    return pc + r_w, pr + r_l


def _sigmoid(x):
    e = np.exp(-np.abs(x))  # stable on both tails
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _batch(n, seed, scale=50.0):
    rng = np.random.default_rng(seed)
    return [-scale * rng.uniform(0.2, 1.0, n) for _ in range(4)]


def _grads(fn, xs, **kw):
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in xs]
        (loss, metrics), g = (jax.value_and_grad(
            lambda *a: fn(*a, **kw), argnums=tuple(range(len(args))), has_aux=True
        ))(*args)
        return float(loss), {k: float(v) for k, v in metrics.items()}, [np.asarray(x) for x in g]


@pytest.mark.parametrize("n", [1, 5, 32])
@pytest.mark.parametrize(
    "opts",
    [
        dict(beta=0.1),
        dict(beta=0.01),
        dict(beta=3.0, reward_epsilon=0.0, rejected_epsilon=2.0),
        dict(beta=0.5, normalize="none"),
        dict(beta=0.1, norm_eps=0.5),
    ],
    ids=str,
)
def test_identity_aux_weight_one_is_sft_on_chosen(n, opts):
    pc, pr, rc, rr = _batch(n, seed=n)
    loss, _, (g_pc, g_pr, _, _) = _grads(losses.mmpo_loss, [pc, pr, rc, rr], aux_weight=1.0, **opts)
    s_w, _ = _np_scores(pc, pr, rc, rr, **opts)
    np.testing.assert_allclose(loss, np.mean(-s_w), rtol=1e-12)
    np.testing.assert_allclose(g_pc, np.full(n, -1.0 / n), rtol=0, atol=1e-14)
    np.testing.assert_allclose(g_pr, np.zeros(n), rtol=0, atol=1e-14)


def test_identity_gradient_does_not_depend_on_beta():
    pc, pr, rc, rr = _batch(16, seed=3)
    grads = [
        _grads(losses.mmpo_loss, [pc, pr, rc, rr], beta=b)[2][:2] for b in (0.01, 0.1, 1.0, 10.0)
    ]
    for g in grads[1:]:
        np.testing.assert_allclose(g[0], grads[0][0], atol=1e-14)
        np.testing.assert_allclose(g[1], grads[0][1], atol=1e-14)


@pytest.mark.parametrize("n", [1, 4, 32])
@pytest.mark.parametrize("scale", [0.5, 5.0, 200.0])
def test_theorem_3_2_mml_term_alone(n, scale):
    rng = np.random.default_rng(n)
    pc, pr, rc, rr = _batch(n, seed=10 + n, scale=scale)
    pc = pc + rng.normal(0, scale * 0.02, n)
    _, _, (g_pc, g_pr, _, _) = _grads(losses.mmpo_loss, [pc, pr, rc, rr], beta=0.1, aux_weight=0.0)
    s_w, s_l = _np_scores(pc, pr, rc, rr, beta=0.1)
    # d(-loss)/d pc = sigmoid(s_w - s_l) / N: both completions pushed up, the likelier harder.
    np.testing.assert_allclose(-g_pc, _sigmoid(s_w - s_l) / n, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(-g_pr, _sigmoid(s_l - s_w) / n, rtol=1e-12, atol=1e-300)
    assert np.all(g_pc < 0) or np.all(_sigmoid(s_w - s_l) < 1e-300)


@pytest.mark.parametrize("w", [0.25, 0.5, 0.9])
def test_aux_weight_interpolates(w):
    pc, pr, rc, rr = _batch(8, seed=7, scale=2.0)
    _, _, (g_pc, g_pr, _, _) = _grads(losses.mmpo_loss, [pc, pr, rc, rr], beta=0.1, aux_weight=w)
    s_w, s_l = _np_scores(pc, pr, rc, rr, beta=0.1)
    sig = _sigmoid(s_w - s_l)
    np.testing.assert_allclose(-g_pc, (sig + w * (1 - sig)) / 8, rtol=1e-12)
    np.testing.assert_allclose(-g_pr, (1 - w) * (1 - sig) / 8, rtol=1e-10)


def test_mmpo_metrics_against_numpy():
    pc, pr, rc, rr = _batch(12, seed=5, scale=30.0)
    beta = 0.2
    loss, m, _ = _grads(losses.mmpo_loss, [pc, pr, rc, rr], beta=beta, aux_weight=0.0)
    s_w, s_l = _np_scores(pc, pr, rc, rr, beta=beta)
    np.testing.assert_allclose(loss, np.mean(-np.logaddexp(s_w, s_l)), rtol=1e-12)
    r_all = np.concatenate([1.0 + beta * rc, 0.1 + beta * rr])
    expected = {
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
        "rewards/chosen": (beta * (pc - rc)).mean(),
        "rewards/rejected": (beta * (pr - rr)).mean(),
        "rewards/margins": (beta * (pc - rc) - beta * (pr - rr)).mean(),
        "rewards/accuracies": (beta * (pc - rc) > beta * (pr - rr)).mean(),
        "mmpo/score_chosen": s_w.mean(),
        "mmpo/score_rejected": s_l.mean(),
        "mmpo/score_accuracy": (s_w > s_l).mean(),
        "mmpo/reward_range": r_all.max() - r_all.min(),
    }
    assert set(m) == set(expected) | {"loss"}
    for k, v in expected.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-12, atol=1e-15, err_msg=k)


def test_dpo_and_simpo_against_numpy():
    pc, pr, rc, rr = _batch(10, seed=9, scale=20.0)
    loss, m, (g_pc, g_pr, _, _) = _grads(losses.dpo_loss, [pc, pr, rc, rr], beta=0.1,
                                         label_smoothing=0.2)
    h = 0.1 * ((pc - rc) - (pr - rr))
    log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    np.testing.assert_allclose(loss, np.mean(-0.8 * log_sig(h) - 0.2 * log_sig(-h)), rtol=1e-12)
    # dL/dpc = -(0.8 sigmoid(-h) - 0.2 sigmoid(h)) * beta / N; dL/dpr is its negative
    expected = -(0.8 * _sigmoid(-h) - 0.2 * _sigmoid(h)) * 0.1 / 10
    np.testing.assert_allclose(g_pc, expected, rtol=1e-10)
    np.testing.assert_allclose(g_pr, -expected, rtol=1e-10)

    pc_a, pr_a = pc / 30.0, pr / 30.0
    loss, m, (g_pc, _) = _grads(losses.simpo_loss, [pc_a, pr_a], beta=2.0, gamma=1.0)
    z = 2.0 * (pc_a - pr_a) - 1.0
    np.testing.assert_allclose(loss, np.mean(-log_sig(z)), rtol=1e-12)
    np.testing.assert_allclose(g_pc, -_sigmoid(-z) * 2.0 / 10, rtol=1e-10)
    np.testing.assert_allclose(m["rewards/chosen"], (2.0 * pc_a).mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rewards/accuracies"], (pc_a > pr_a).mean())


# --------------------------------------------------------------------------- #
# Degenerate inputs: nothing non-finite, in float32 (the training dtype)
# --------------------------------------------------------------------------- #
def _all_losses(xs, mask=None, beta=0.1, **mmpo_kw):
    pc, pr, rc, rr = xs
    return {
        "mmpo": lambda *a: losses.mmpo_loss(*a, beta=beta, pair_mask=mask, **mmpo_kw),
        "mmpo_aux0": lambda *a: losses.mmpo_loss(*a, beta=beta, aux_weight=0.0, pair_mask=mask,
                                                 **mmpo_kw),
        "dpo": lambda *a: losses.dpo_loss(*a, beta=beta, label_smoothing=0.1, pair_mask=mask),
        "simpo": lambda pc_, pr_, rc_, rr_: losses.simpo_loss(
            pc_, pr_, beta=beta * 20, gamma=1.0, pair_mask=mask
        ),
    }


def _degenerate_cases():
    rng = np.random.default_rng(0)
    n = 6
    equal = np.full(n, -12.0)
    yield "all rewards equal", [rng.normal(-10, 1, n), rng.normal(-10, 1, n), equal, equal], None, \
        dict(reward_epsilon=0.5, rejected_epsilon=0.5)
    yield "one pair", [np.array([-3.0]), np.array([-4.0]), np.array([-3.5]), np.array([-3.5])], None, {}
    yield "log-probs -1e4", [np.full(n, -1e4), np.full(n, -1e4 + 1), np.full(n, -1e4),
                             np.full(n, -9.9e3)], None, {}
    big = [rng.uniform(-1e4, -1e3, n) for _ in range(4)]
    yield "mixed -1e4 / tiny", [big[0], np.zeros(n), big[2], np.full(n, -1e-8)], None, {}
    mask = np.zeros(n)
    mask[2] = 1
    garbage = [rng.normal(0, 1, n) for _ in range(4)]
    for g in garbage:
        g[mask == 0] = np.nan  # padding pairs may hold anything
    yield "all but one masked (NaN padding)", garbage, mask, {}
    yield "all masked", [rng.normal(0, 1, n) for _ in range(4)], np.zeros(n), {}


@pytest.mark.parametrize("beta", [1e-3, 0.1, 10.0])
@pytest.mark.parametrize("case", list(_degenerate_cases()), ids=lambda c: c[0])
def test_no_nan_or_inf(case, beta):
    _, xs, mask, kw = case
    args = [jnp.asarray(x, jnp.float32) for x in xs]
    for name, fn in _all_losses(args, None if mask is None else jnp.asarray(mask), beta, **kw).items():
        (loss, metrics), grads = (jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))(
            *args
        )
        assert np.isfinite(float(loss)), (name, float(loss))
        for k, v in metrics.items():
            assert np.isfinite(float(v)), (name, k, float(v))
        for i, g in enumerate(grads):
            assert np.all(np.isfinite(np.asarray(g))), (name, i, g)
        if mask is not None:
            for g in grads:
                assert np.all(np.asarray(g)[mask == 0] == 0), (name, "padding got gradient")


def test_all_rewards_equal_gives_unit_normalised_rewards():
    n = 4
    pc = jnp.array([-1.0, -2.0, -3.0, -4.0])
    pr = jnp.array([-2.0, -2.0, -2.0, -2.0])
    ref = jnp.full((n,), -7.0)
    _, m = losses.mmpo_loss(pc, pr, ref, ref, beta=0.1, reward_epsilon=0.3, rejected_epsilon=0.3)
    # hi == lo: n = eps/eps = 1 for every completion, so s = logp + 1
    np.testing.assert_allclose(float(m["mmpo/score_chosen"]), float(jnp.mean(pc)) + 1.0, rtol=1e-6)
    assert float(m["mmpo/reward_range"]) == 0.0


def test_bfloat16_inputs_are_upcast():
    pc, pr, rc, rr = [jnp.asarray(x, jnp.bfloat16) for x in _batch(4, seed=1, scale=30.0)]
    loss, m = losses.mmpo_loss(pc, pr, rc, rr, beta=0.1, aux_weight=0.0)
    assert loss.dtype == jnp.float32
    ref, _ = losses.mmpo_loss(*[x.astype(jnp.float32) for x in (pc, pr, rc, rr)], beta=0.1,
                              aux_weight=0.0)
    assert float(loss) == float(ref)


# --------------------------------------------------------------------------- #
# pair_mask == dropping the pairs
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "name,kw",
    [
        ("mmpo", dict(beta=0.1)),
        ("mmpo", dict(beta=0.3, aux_weight=0.0)),
        ("mmpo", dict(beta=0.3, aux_weight=0.5, normalize="none", entropy_weight=0.2)),
        ("dpo", dict(beta=0.1, label_smoothing=0.1)),
        ("simpo", dict(beta=2.0, gamma=0.5)),
    ],
)
def test_pair_mask_equals_dropping_pairs(name, kw):
    rng = np.random.default_rng(4)
    n = 11
    xs = [rng.uniform(-60, -5, n) for _ in range(4)]
    ent = rng.uniform(0, 3, n)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], bool)
    # padding pairs hold extreme values that would move min/max if they leaked
    for x in xs:
        x[~mask] = rng.choice([-1e6, 1e6], size=(~mask).sum())
    fn = getattr(losses, f"{name}_loss")
    n_in = 2 if name == "simpo" else 4

    def run(arrays, entropy, m):
        kwargs = dict(kw)
        if "entropy_weight" in kw:
            kwargs["entropy"] = jnp.asarray(entropy)
        if m is not None:
            kwargs["pair_mask"] = jnp.asarray(m)
        with jax.enable_x64(True):
            (loss, met), g = (jax.value_and_grad(
                lambda *a: fn(*a, **kwargs), argnums=tuple(range(n_in)), has_aux=True
            ))(*[jnp.asarray(a, jnp.float64) for a in arrays[:n_in]])
        return float(loss), {k: float(v) for k, v in met.items()}, [np.asarray(x) for x in g]

    loss_m, met_m, g_m = run(xs, ent, mask.astype(np.float64))
    loss_d, met_d, g_d = run([x[mask] for x in xs], ent[mask], None)
    np.testing.assert_allclose(loss_m, loss_d, rtol=1e-12)
    assert set(met_m) == set(met_d)
    for k in met_d:
        np.testing.assert_allclose(met_m[k], met_d[k], rtol=1e-12, atol=1e-15, err_msg=k)
    for gm, gd in zip(g_m, g_d):
        np.testing.assert_allclose(gm[mask], gd, rtol=1e-12, atol=1e-15)
        assert np.all(gm[~mask] == 0)


def test_bad_arguments_are_named():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="normalize"):
        losses.mmpo_loss(x, x, x, x, beta=0.1, normalize="zscore")
    with pytest.raises(ValueError, match="entropy"):
        losses.mmpo_loss(x, x, x, x, beta=0.1, entropy_weight=0.1)
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        losses.dpo_loss(jnp.zeros((3, 2)), x, x, x, beta=0.1)
    with pytest.raises(ValueError, match="pair_mask"):
        losses.simpo_loss(x, x, beta=2.0, gamma=1.0, pair_mask=jnp.ones(4))
