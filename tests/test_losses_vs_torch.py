"""JAX losses against the independent PyTorch reference, in float64.

Loss, every metric, and the gradients with respect to all four log-prob inputs
must agree to 1e-10 relative, over batch sizes, magnitudes and every option.
"""

import itertools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmpo_jax.losses import mmpo as jl  # noqa: E402
from mmpo_jax.torch_ref import losses as tl  # noqa: E402

RTOL = 1e-10

MMPO_OPTIONS = [
    dict(beta=0.1),
    dict(beta=0.5, aux_weight=0.0),
    dict(beta=0.05, aux_weight=0.3, reward_epsilon=2.0, rejected_epsilon=-0.5),
    dict(beta=1.0, normalize="none"),
    dict(beta=0.1, aux_weight=0.0, normalize="none", norm_eps=1e-3),
    dict(beta=0.1, entropy_weight=0.5),
    dict(beta=0.2, aux_weight=0.7, entropy_weight=0.01, masked=True),
    dict(beta=0.1, masked=True),
]
DPO_OPTIONS = [
    dict(beta=0.1),
    dict(beta=0.5, label_smoothing=0.1),
    dict(beta=0.01, label_smoothing=0.3, masked=True),
]
SIMPO_OPTIONS = [
    dict(beta=2.0, gamma=1.0),
    dict(beta=10.0, gamma=0.0),
    dict(beta=2.5, gamma=1.375, masked=True),
]
SIZES = [1, 3, 16, 64]
MAGNITUDES = [1.0, 100.0, 1e4]


def _inputs(n: int, scale: float, seed: int, with_entropy: bool, masked: bool):
    rng = np.random.default_rng(seed)
    ref_c = -scale * rng.uniform(0.1, 1.0, n)
    ref_r = -scale * rng.uniform(0.1, 1.0, n)
    data = {
        "policy_chosen_logps": ref_c + 0.05 * scale * rng.normal(size=n),
        "policy_rejected_logps": ref_r + 0.05 * scale * rng.normal(size=n),
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    extra = {}
    if with_entropy:
        extra["entropy"] = scale * rng.uniform(0.0, 2.0, n)
    if masked:
        mask = rng.uniform(size=n) < 0.7
        mask[0] = True  # at least one real pair
        extra["pair_mask"] = mask.astype(np.float64)
    return data, extra


def _jax_run(fn, data, extra, kwargs):
    names = list(data)

    def f(*xs):
        return fn(*xs, **{k: jax.numpy.asarray(v) for k, v in extra.items()}, **kwargs)

    # op-by-op (no jit): primitives compile once per shape and are reused
    # across the many small cases, far cheaper than a whole-graph compile each
    (loss, metrics), grads = jax.value_and_grad(f, argnums=tuple(range(len(names))), has_aux=True)(
        *[jax.numpy.asarray(data[k]) for k in names]
    )
    return float(loss), {k: float(v) for k, v in metrics.items()}, [np.asarray(g) for g in grads]


def _torch_run(fn, data, extra, kwargs):
    xs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in data.values()]
    ex = {k: torch.tensor(v, dtype=torch.float64) for k, v in extra.items()}
    loss, metrics = fn(*xs, **ex, **kwargs)
    loss.backward()
    return float(loss), {k: float(v) for k, v in metrics.items()}, [x.grad.numpy() for x in xs]


def _assert_close(a, b, what, scale=None):
    """max|a - b| <= RTOL * scale, scale = max|b| unless given."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if scale is None:
        scale = float(np.max(np.abs(b))) if b.size else 0.0
    scale = max(scale, 1e-300)
    err = float(np.max(np.abs(a - b))) if b.size else 0.0
    assert err <= RTOL * scale + 1e-300, f"{what}: max abs diff {err:.3e} vs scale {scale:.3e}"


def _compare(jfn, tfn, data, extra, kwargs):
    with jax.enable_x64(True):
        jloss, jmet, jgrads = _jax_run(jfn, data, extra, kwargs)
    tloss, tmet, tgrads = _torch_run(tfn, data, extra, kwargs)
    _assert_close(jloss, tloss, "loss")
    assert set(jmet) == set(tmet), (sorted(jmet), sorted(tmet))
    for key in tmet:
        _assert_close(jmet[key], tmet[key], f"metric {key}")
    # Gradients are relative to the largest gradient entry of the call: with
    # aux_weight=1 the rejected gradient is exactly 0 in theory and rounding
    # noise (~1e-17) in both implementations, which has no relative scale of its own.
    grad_scale = max(float(np.max(np.abs(g))) for g in tgrads)
    for i, (jg, tg) in enumerate(zip(jgrads, tgrads)):
        _assert_close(jg, tg, f"gradient of input {i}", grad_scale)
    return jloss


@pytest.mark.parametrize("opts", MMPO_OPTIONS, ids=str)
@pytest.mark.parametrize("n,scale", list(itertools.product(SIZES, MAGNITUDES)))
def test_mmpo_matches_torch(opts, n, scale):
    opts = dict(opts)
    masked = opts.pop("masked", False)
    data, extra = _inputs(n, scale, seed=n, with_entropy="entropy_weight" in opts, masked=masked)
    _compare(jl.mmpo_loss, tl.mmpo_loss, data, extra, opts)


@pytest.mark.parametrize("opts", DPO_OPTIONS, ids=str)
@pytest.mark.parametrize("n,scale", list(itertools.product(SIZES, MAGNITUDES)))
def test_dpo_matches_torch(opts, n, scale):
    opts = dict(opts)
    masked = opts.pop("masked", False)
    data, extra = _inputs(n, scale, seed=100 + n, with_entropy=False, masked=masked)
    _compare(jl.dpo_loss, tl.dpo_loss, data, extra, opts)


@pytest.mark.parametrize("opts", SIMPO_OPTIONS, ids=str)
@pytest.mark.parametrize("n,scale", list(itertools.product(SIZES, [0.5, 5.0, 50.0])))
def test_simpo_matches_torch(opts, n, scale):
    opts = dict(opts)
    masked = opts.pop("masked", False)
    data, extra = _inputs(n, scale, seed=200 + n, with_entropy=False, masked=masked)
    data = {k: data[k] for k in ("policy_chosen_logps", "policy_rejected_logps")}
    _compare(jl.simpo_loss, tl.simpo_loss, data, extra, opts)


def test_torch_reference_is_not_trivially_equal():
    """Negative control: a changed option must change the result beyond RTOL."""
    data, extra = _inputs(8, 10.0, seed=0, with_entropy=False, masked=False)
    with jax.enable_x64(True):
        a, _, _ = _jax_run(jl.mmpo_loss, data, extra, dict(beta=0.1, aux_weight=0.0))
    b, _, _ = _torch_run(tl.mmpo_loss, data, extra, dict(beta=0.1, aux_weight=0.0, rejected_epsilon=0.2))
    assert abs(a - b) > 1e-6 * abs(b)
