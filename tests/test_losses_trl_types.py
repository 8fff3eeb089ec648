"""TRL's DPO loss types, their mixtures, f-divergences, CPO and ORPO: JAX against the
PyTorch reference (`mmpo_jax.torch_ref.trl_losses`, written from TRL's formulas) in
float64 to 1e-10 (loss, every metric, the gradients of every input), on one device and
under `shard_map` on 8 simulated devices; no NaN from any input; the config's refusals."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")

from mmpo_jax.losses import declarations as R  # noqa: E402
from mmpo_jax.losses import mmpo as jl  # noqa: E402
from mmpo_jax.config import load_config  # noqa: E402
from mmpo_jax.config_schema import ConfigError, MeshConfig  # noqa: E402
from mmpo_jax.sharding import BATCH_AXES, make_mesh  # noqa: E402
from mmpo_jax.torch_ref import losses as tl  # noqa: E402

RTOL = 1e-10
SUMS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")

DPO_CASES = [dict(loss_type=k) for k in R.DPO_LOSS_TYPES if k != "exo_pair"] + [
    dict(loss_type="exo_pair", label_smoothing=1e-3),
    dict(loss_type="exo_pair", label_smoothing=0.3, beta=0.5),
    dict(loss_type="sigmoid", label_smoothing=0.2),
    dict(loss_type="robust", label_smoothing=0.3),
    dict(loss_type="aot", label_smoothing=0.1),
    dict(loss_type="aot_unpaired", label_smoothing=0.25),
    dict(loss_type="discopop", discopop_tau=0.5, beta=0.3),
    dict(loss_type=["sigmoid", "sft"]),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]),
    dict(loss_type=["hinge", "ipo", "aot", "bco_pair"], loss_weights=[0.5, 2.0, 1.0, 0.1]),
    dict(loss_type=["apo_zero", "nca_pair", "sppo_hard"], beta=0.5),
] + [
    dict(loss_type=kind, f_divergence_type=div, f_alpha_divergence_coef=coef)
    for kind in ("sigmoid", "ipo", "hinge", "robust", "discopop", "sigmoid_norm")
    for div, coef in (("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                      ("alpha_divergence", 1.0))
] + [dict(loss_type=["sigmoid", "sft", "exo_pair"], f_divergence_type="js_divergence", label_smoothing=0.1)]

CPO_CASES = [
    dict(loss_type=kind, cpo_alpha=alpha, alphapo_alpha=a, averaged=avg, label_smoothing=e)
    for kind in R.CPO_LOSS_TYPES
    for alpha, a, avg, e in ((1.0, 0.0, kind in ("ipo", "simpo"), 0.0), (0.0, 0.0, False, 0.1),
                             (0.5, 0.25, True, 0.0), (1.0, -0.1, False, 0.2))
]


def _label(case):
    return ",".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in case.items())


def _inputs(n: int, seed: int, *, averaged: bool = False, masked: bool = True):
    """`[n]` float64 log-probs of answers of 3-40 tokens (sums, or their per-token means),
    token counts, whole-sequence sums for ORPO, and a pair mask with a NaN padding pair."""
    rng = np.random.default_rng(seed)
    tok_c = rng.integers(3, 40, n).astype(np.float64)
    tok_r = rng.integers(3, 40, n).astype(np.float64)
    rc = -tok_c * rng.uniform(0.5, 2.0, n)
    rr = -tok_r * rng.uniform(0.5, 2.0, n)
    pc = rc + rng.normal(0, 2.0, n)
    pr = rr + rng.normal(0, 2.0, n)
    arrays = [pc, pr, rc, rr]
    if averaged:
        arrays = [pc / tok_c, pr / tok_r, rc / tok_c, rr / tok_r]
    mask = np.ones(n)
    if masked and n > 2:
        mask[rng.permutation(n)[: n // 4]] = 0.0
    for a in arrays:
        a[mask == 0] = np.nan
    seq = pc - rng.uniform(5, 50, n)
    return dict(zip(SUMS, arrays)), dict(chosen_tokens=tok_c, rejected_tokens=tok_r, pair_mask=mask), seq


def _jax_value_and_grads(fn, data, extra, kwargs, positional):
    with jax.enable_x64(True):
        args = [jnp.asarray(data[k]) for k in positional]
        extra = {k: jnp.asarray(v) for k, v in extra.items()}

        def f(*xs):
            return fn(**dict(zip(positional, xs)), **extra, **kwargs)

        (loss, metrics), grads = jax.value_and_grad(f, argnums=tuple(range(len(args))), has_aux=True)(*args)
        return float(loss), {k: float(v) for k, v in metrics.items()}, [np.asarray(g) for g in grads]


def _torch_value_and_grads(fn, data, extra, kwargs, positional):
    args = [torch.tensor(data[k], dtype=torch.float64, requires_grad=True) for k in positional]
    extra = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in extra.items()}
    loss, metrics = fn(**dict(zip(positional, args)), **extra, **kwargs)
    loss.backward()
    grads = [np.zeros(a.shape) if a.grad is None else a.grad.numpy() for a in args]  # (sft: no reference)
    return float(loss.detach()), {k: float(v) for k, v in metrics.items()}, grads


def _assert_same(ours, theirs, mask):
    loss, metrics, grads = ours
    t_loss, t_metrics, t_grads = theirs
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, t_loss, rtol=RTOL, atol=1e-13)
    assert set(metrics) == set(t_metrics)  # (jax.grad returns the dict sorted)
    for key in metrics:
        np.testing.assert_allclose(metrics[key], t_metrics[key], rtol=RTOL, atol=1e-13, err_msg=key)
    for g, tg in zip(grads, t_grads):
        real = mask > 0
        np.testing.assert_allclose(g[real], tg[real], rtol=RTOL, atol=1e-13)
        assert np.all(g[~real] == 0)  # padding pairs get no gradient


@pytest.mark.parametrize("case", DPO_CASES, ids=_label)
@pytest.mark.parametrize("n", [1, 9, 32])
def test_dpo_loss_types_match_the_reference(case, n):
    case = dict(case)
    beta = case.pop("beta", 0.1)
    data, extra, _ = _inputs(n, seed=n)
    kwargs = dict(beta=beta, **case)
    ours = _jax_value_and_grads(jl.dpo_loss, data, extra, kwargs, SUMS)
    theirs = _torch_value_and_grads(tl.dpo_loss, data, extra, kwargs, SUMS)
    _assert_same(ours, theirs, extra["pair_mask"])
    kinds = case["loss_type"] if isinstance(case["loss_type"], list) else [case["loss_type"]]
    spec = R.DECLARATIONS["dpo"]
    assert set(ours[1]) == set(spec.metric_names(reference=True, entropy=False, components=tuple(kinds)))
    if len(kinds) > 1:  # the weighted sum of the per-component metrics
        weights = case.get("loss_weights") or [1.0] * len(kinds)
        total = sum(w * ours[1][f"loss/{k}"] for k, w in zip(kinds, weights))
        np.testing.assert_allclose(ours[0], total, rtol=1e-12)


WPO_CASES = [dict(loss_type=k) for k in ("sigmoid", "ipo", "hinge", "sft", "discopop")] + [
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4]),
    dict(loss_type=["robust", "apo_down", "sigmoid_norm"], label_smoothing=0.2),
]


def test_ld_dpo_sft_reads_the_plain_chosen_log_probs():
    data, extra, _ = _inputs(12, seed=13)
    extra["chosen_unweighted_logps"] = data["policy_chosen_logps"] * 1.3  # plain sums: the longer tails in
    kwargs = dict(beta=0.1, loss_type=["sigmoid", "sft"])
    ours = _jax_value_and_grads(jl.dpo_loss, data, extra, kwargs, SUMS)
    _assert_same(ours, _torch_value_and_grads(tl.dpo_loss, data, extra, kwargs, SUMS), extra["pair_mask"])
    real = extra["pair_mask"] > 0
    want = -np.sum(extra["chosen_unweighted_logps"][real]) / np.sum(extra["chosen_tokens"][real])
    assert ours[1]["loss/sft"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("case", WPO_CASES, ids=_label)
def test_wpo_pair_weights_match_the_reference(case):
    data, extra, _ = _inputs(12, seed=11)
    extra["pair_weights"] = np.random.default_rng(12).uniform(0.05, 1.5, 12)
    kwargs = dict(beta=0.1, **case)
    ours = _jax_value_and_grads(jl.dpo_loss, data, extra, kwargs, SUMS)
    _assert_same(ours, _torch_value_and_grads(tl.dpo_loss, data, extra, kwargs, SUMS), extra["pair_mask"])
    unweighted = _jax_value_and_grads(jl.dpo_loss, data, {k: v for k, v in extra.items() if k != "pair_weights"},
                                      kwargs, SUMS)
    assert abs(ours[0] - unweighted[0]) > 1e-3 * abs(unweighted[0])  # the weights do something


@pytest.mark.parametrize("case", CPO_CASES, ids=_label)
def test_cpo_matches_the_reference(case):
    data, extra, _ = _inputs(11, seed=3, averaged=case["averaged"])
    extra = {k: extra[k] for k in ("chosen_tokens", "pair_mask")}
    kwargs = dict(beta=0.1, gamma=0.5, **case)
    pos = SUMS[:2]
    _assert_same(_jax_value_and_grads(jl.cpo_loss, data, extra, kwargs, pos),
                 _torch_value_and_grads(tl.cpo_loss, data, extra, kwargs, pos), extra["pair_mask"])


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_the_reference(beta):
    data, extra, seq = _inputs(13, seed=4, averaged=True)
    data["chosen_sequence_logps"] = seq
    seq_tokens = extra["chosen_tokens"] + 17.0
    extra = dict(pair_mask=extra["pair_mask"], chosen_sequence_tokens=seq_tokens)
    pos = SUMS[:2] + ("chosen_sequence_logps",)
    _assert_same(_jax_value_and_grads(jl.orpo_loss, data, extra, dict(beta=beta), pos),
                 _torch_value_and_grads(tl.orpo_loss, data, extra, dict(beta=beta), pos), extra["pair_mask"])


def test_simpo_is_cpo_with_its_loss_type_and_no_nll():
    data, extra, _ = _inputs(16, seed=5, averaged=True)
    with jax.enable_x64(True):
        pc, pr = (jnp.asarray(data[k]) for k in SUMS[:2])
        mask = jnp.asarray(extra["pair_mask"])
        simpo = jax.value_and_grad(lambda a, b: jl.simpo_loss(a, b, beta=2.5, gamma=1.4, pair_mask=mask)[0],
                                   argnums=(0, 1))(pc, pr)
        cpo = jax.value_and_grad(lambda a, b: jl.cpo_loss(a, b, beta=2.5, gamma=1.4, loss_type="simpo",
                                                          cpo_alpha=0.0, pair_mask=mask)[0], argnums=(0, 1))(pc, pr)
        np.testing.assert_allclose(float(simpo[0]), float(cpo[0]), rtol=1e-14)
        for a, b in zip(simpo[1], cpo[1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14)
        # the NLL term is what cpo_alpha adds
        with_nll = jl.cpo_loss(pc, pr, beta=2.5, gamma=1.4, loss_type="simpo", cpo_alpha=1.0, pair_mask=mask)
        assert float(with_nll[0]) == pytest.approx(float(cpo[0]) + float(with_nll[1]["nll_loss"]), rel=1e-12)


# --------------------------------------------------------------------------- #
# Global statistics under shard_map (8 simulated devices)
# --------------------------------------------------------------------------- #
SHARDED_CASES = [dict(loss_type=k) for k in R.DPO_LOSS_TYPES if k != "exo_pair"] + [
    dict(loss_type="exo_pair", label_smoothing=0.01),
    dict(loss_type=["sigmoid", "sft", "aot_unpaired"], loss_weights=[1.0, 0.3, 0.5]),
]


def _sharded_value_and_grads(kwargs, data, extra, mesh):
    def local(pc, pr, rc, rr, tc, tr, mask):
        return jl.dpo_loss(pc, pr, rc, rr, chosen_tokens=tc, rejected_tokens=tr, pair_mask=mask,
                           axis_name=BATCH_AXES, **kwargs)

    spec = P(BATCH_AXES)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 7, out_specs=(P(), P()))
    with jax.enable_x64(True):
        args = [jnp.asarray(data[k]) for k in SUMS]
        rest = [jnp.asarray(extra[k]) for k in ("chosen_tokens", "rejected_tokens", "pair_mask")]
        (loss, metrics), grads = jax.jit(jax.value_and_grad(
            lambda *a: fn(*a, *rest), argnums=(0, 1, 2, 3), has_aux=True))(*args)
        return float(loss), {k: float(v) for k, v in metrics.items()}, [np.asarray(g) for g in grads]


@functools.cache
def _mesh():
    assert jax.device_count() == 8, "conftest must set 8 simulated devices"
    return make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))


@pytest.mark.parametrize("case", SHARDED_CASES, ids=_label)
def test_sharded_loss_types_equal_the_whole_batch_reference(case):
    data, extra, _ = _inputs(32, seed=7)
    kwargs = dict(beta=0.1, **case)
    theirs = _torch_value_and_grads(tl.dpo_loss, data, extra, kwargs, SUMS)
    _assert_same(_sharded_value_and_grads(kwargs, data, extra, _mesh()), theirs, extra["pair_mask"])


@pytest.mark.parametrize("name", ["cpo", "cpo_averaged", "orpo", "dpo_wpo"])
def test_sharded_nll_terms_and_weights_are_global(name):
    """CPO's and ORPO's token-mean NLL and WPO's weights under shard_map on 8 devices equal
    the whole-batch reference (a per-device token mean would not)."""
    data, extra, seq = _inputs(32, seed=9, averaged=name in ("cpo_averaged", "orpo"))
    weights = np.random.default_rng(10).uniform(0.1, 1.5, 32)
    seq_tokens = extra["chosen_tokens"] + 11.0
    spec = P(BATCH_AXES)
    if name == "orpo":
        kwargs: dict = dict(beta=0.3)
        theirs = _torch_value_and_grads(
            tl.orpo_loss, {**data, "chosen_sequence_logps": seq},
            dict(pair_mask=extra["pair_mask"], chosen_sequence_tokens=seq_tokens), kwargs,
            SUMS[:2] + ("chosen_sequence_logps",))

        def local(pc, pr, s, st, mask):
            return jl.orpo_loss(pc, pr, chosen_sequence_logps=s, chosen_sequence_tokens=st, pair_mask=mask,
                                axis_name=BATCH_AXES, **kwargs)
        args = [data[SUMS[0]], data[SUMS[1]], seq]
        rest = [seq_tokens, extra["pair_mask"]]
    elif name == "dpo_wpo":
        kwargs = dict(beta=0.1, loss_type=["sigmoid", "sft"])
        theirs = _torch_value_and_grads(tl.dpo_loss, data, {**extra, "pair_weights": weights}, kwargs, SUMS)

        def local(pc, pr, rc, rr, tc, tr, w, mask):
            return jl.dpo_loss(pc, pr, rc, rr, chosen_tokens=tc, rejected_tokens=tr, pair_weights=w,
                               pair_mask=mask, axis_name=BATCH_AXES, **kwargs)
        args = [data[k] for k in SUMS]
        rest = [extra["chosen_tokens"], extra["rejected_tokens"], weights, extra["pair_mask"]]
    else:
        kwargs = dict(beta=0.1, loss_type="simpo" if name == "cpo_averaged" else "sigmoid",
                      averaged=name == "cpo_averaged")
        theirs = _torch_value_and_grads(tl.cpo_loss, data, dict(chosen_tokens=extra["chosen_tokens"],
                                                                pair_mask=extra["pair_mask"]), kwargs, SUMS[:2])

        def local(pc, pr, tc, mask):
            return jl.cpo_loss(pc, pr, chosen_tokens=tc, pair_mask=mask, axis_name=BATCH_AXES, **kwargs)
        args = [data[SUMS[0]], data[SUMS[1]]]
        rest = [extra["chosen_tokens"], extra["pair_mask"]]
    n_args = len(args)
    fn = jax.shard_map(local, mesh=_mesh(), in_specs=(spec,) * (n_args + len(rest)), out_specs=(P(), P()))
    with jax.enable_x64(True):
        rest_j = [jnp.asarray(x) for x in rest]
        (loss, metrics), grads = jax.jit(jax.value_and_grad(lambda *a: fn(*a, *rest_j), argnums=tuple(range(n_args)),
                                                            has_aux=True))(*[jnp.asarray(a) for a in args])
        ours = (float(loss), {k: float(v) for k, v in metrics.items()}, [np.asarray(g) for g in grads])
    _assert_same(ours, (theirs[0], theirs[1], theirs[2][:n_args]), extra["pair_mask"])


def test_aot_sorts_the_global_batch_and_per_device_sorting_is_caught():
    """The negative control: sorting each device's quarter on its own (what TRL does per
    process) gives another loss, and the check above would see it."""
    data, extra, _ = _inputs(32, seed=8)
    kwargs = dict(beta=0.1, loss_type="aot")
    ours = _sharded_value_and_grads(kwargs, data, extra, _mesh())
    theirs = _torch_value_and_grads(tl.dpo_loss, data, extra, kwargs, SUMS)
    assert ours[0] == pytest.approx(theirs[0], rel=RTOL)
    # per-device: the mean over devices' own sorted blocks (4 pairs each, padding dropped)
    blocks = []
    for d in range(8):
        part = slice(4 * d, 4 * d + 4)
        sub = {k: v[part] for k, v in data.items()}
        sub_extra = {k: v[part] for k, v in extra.items()}
        real = sub_extra["pair_mask"].sum()
        if real:
            blocks.append((_torch_value_and_grads(tl.dpo_loss, sub, sub_extra, kwargs, SUMS)[0], real))
    per_device = sum(v * r for v, r in blocks) / sum(r for _, r in blocks)
    assert abs(per_device - theirs[0]) > 1e-4 * abs(theirs[0])


# --------------------------------------------------------------------------- #
# No NaN from any input
# --------------------------------------------------------------------------- #
def _extreme_inputs():
    """float32 pairs: equal log-probs, empty answers (0 tokens, log-prob 0), log-ratios of
    +-1e4, a tiny margin, and a padding pair holding NaN."""
    pc = np.array([-5.0, 0.0, -1e4, -1.0, -20.0, np.nan], np.float32)
    pr = np.array([-5.0, 0.0, -1.0, -1e4, -20.000001, np.nan], np.float32)
    rc = np.array([-5.0, 0.0, -1.0, -1e4, -1.0, 0.0], np.float32)
    rr = np.array([-5.0, 0.0, -1e4, -1.0, -1.0, 0.0], np.float32)
    tokens = np.array([3.0, 0.0, 400.0, 2.0, 7.0, 0.0], np.float32)
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
    return [jnp.asarray(x) for x in (pc, pr, rc, rr)], jnp.asarray(tokens), jnp.asarray(mask)


NAN_CASES = [dict(loss_type=k, label_smoothing=e) for k in R.DPO_LOSS_TYPES for e in (1e-6, 0.4999)] + [
    dict(loss_type=k, label_smoothing=0.0) for k in R.DPO_LOSS_TYPES if k != "exo_pair"] + [
    dict(loss_type=k, f_divergence_type=d, f_alpha_divergence_coef=c, label_smoothing=1e-3)
    for k in R.F_DIVERGENCE_LOSS_TYPES for d, c in (("forward_kl", 0.5), ("js_divergence", 0.5),
                                                    ("alpha_divergence", 0.5), ("alpha_divergence", 3.0))
] + [dict(loss_type="discopop", discopop_tau=3.0, beta=1.0)]


def _no_nan(fn, args, **kwargs):
    loss_and_grads = jax.value_and_grad(lambda *a: fn(*a, **kwargs)[0], argnums=tuple(range(len(args))))
    loss, grads = loss_and_grads(*args)
    metrics = fn(*args, **kwargs)[1]
    assert not np.isnan(float(loss))
    for g in grads:
        assert not np.any(np.isnan(np.asarray(g)))
    for key, value in metrics.items():
        assert not np.isnan(float(value)), key
    return float(loss)


@pytest.mark.parametrize("case", NAN_CASES, ids=_label)
@pytest.mark.parametrize("beta", [0.1, 10.0])
def test_no_nan_from_extreme_dpo_inputs(case, beta):
    (pc, pr, rc, rr), tokens, mask = _extreme_inputs()
    kwargs = {"beta": beta, **case}
    _no_nan(jl.dpo_loss, (pc, pr, rc, rr), chosen_tokens=tokens, rejected_tokens=tokens, pair_mask=mask, **kwargs)


@pytest.mark.parametrize("kind", R.CPO_LOSS_TYPES)
@pytest.mark.parametrize("alphapo", [0.0, 0.5, -0.5])
def test_no_nan_from_extreme_cpo_and_orpo_inputs(kind, alphapo):
    (pc, pr, _, _), tokens, mask = _extreme_inputs()
    _no_nan(jl.cpo_loss, (pc, pr), beta=0.1, loss_type=kind, alphapo_alpha=alphapo, chosen_tokens=tokens,
            averaged=True, pair_mask=mask)
    # ORPO on per-token means: 0 (an empty answer), near 0 and very negative
    avg_c = jnp.asarray([-1e-9, 0.0, -30.0, -1e-3, -2.0, np.nan], jnp.float32)
    avg_r = jnp.asarray([0.0, 0.0, -1e-3, -30.0, -2.0, np.nan], jnp.float32)
    assert np.isfinite(_no_nan(lambda c, r, seq, **kw: jl.orpo_loss(c, r, chosen_sequence_logps=seq, **kw),
                               (avg_c, avg_r, pc), beta=0.1, chosen_sequence_tokens=tokens, pair_mask=mask))


# --------------------------------------------------------------------------- #
# The config's checks name the keys
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("overrides,match", [
    (["loss.name=dpo", "loss.loss_type=exo_pair"], "exo_pair needs label_smoothing > 0"),
    (["loss.name=dpo", "loss.loss_type=robust", "loss.label_smoothing=0.5"], r"label_smoothing=0.5.*\[0, 0.5\)"),
    (["loss.name=dpo", "loss.loss_type=[sigmoid,sft]", "loss.loss_weights=[1.0]"], "one weight per loss.loss_type"),
    (["loss.name=dpo", "loss.loss_type=[sigmoid,sigmoid]"], "names a loss type twice"),
    (["loss.name=dpo", "loss.loss_type=sigmoidd"], "choose from sigmoid, hinge"),
    (["loss.name=dpo", "loss.loss_type=aot", "loss.f_divergence_type=forward_kl"],
     "does not apply to loss_type aot"),
    (["loss.name=dpo", "loss.loss_type=ipo", "loss.average_logps=true"], "set loss.average_logps=false"),
    (["loss.name=dpo", "loss.f_divergence_type=chi2"], "not a valid choice"),
    (["loss.name=mmpo", "loss.loss_type=hinge"], "loss.name=mmpo has no loss types"),
    (["loss.name=cpo", "loss.loss_type=bco_pair"], "CPO takes one of sigmoid, hinge, ipo, simpo"),
    (["loss.name=cpo", "loss.loss_type=[sigmoid,hinge]"], "CPO takes one of"),
    (["loss.name=dpo", "loss.discopop_tau=0"], "discopop_tau=0.0: must be > 0"),
    (["loss.name=dpo", "model.reference=none"], "reference"),
    (["loss.name=orpo", "loss.average_logps=false"], "ORPO always uses length-averaged"),
    (["loss.name=dpo", "loss.loss_type=aot", "loss.use_weighting=true"], "does not apply to loss_type aot"),
    (["loss.name=mmpo", "loss.use_weighting=true"], "loss.name=dpo only"),
    (["loss.name=simpo", "loss.ld_alpha=0.5"], "LD-DPO's: loss.name=dpo only"),
    (["loss.name=dpo", "loss.ld_alpha=1.5"], r"ld_alpha=1.5: must be in \[0, 1\]"),
    (["loss.name=dpo", "loss.ld_alpha=0.5", "loss.average_logps=true"], "weighs sequence sums"),
])
def test_invalid_combinations_stop_at_start_naming_the_keys(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_cpo_defaults_follow_trl():
    cfg = load_config(None, ["loss.name=cpo"]).loss
    assert (cfg.beta, cfg.gamma, cfg.cpo_alpha, cfg.average_logps) == (0.1, 0.5, 1.0, False)
    assert load_config(None, ["loss.name=cpo", "loss.loss_type=simpo"]).loss.average_logps is True
    assert load_config(None, ["loss.name=cpo", "loss.loss_type=ipo"]).loss.average_logps is True
    assert load_config(None, ["loss.name=simpo"]).loss.gamma == 1.0


# --------------------------------------------------------------------------- #
# LD-DPO's token weights and WPO's weights from the log-prob pass
# --------------------------------------------------------------------------- #
def test_length_desensitised_mask_weighs_the_longer_tail():
    from mmpo_jax.train.pair_logps import length_desensitised_mask

    mask = np.zeros((2, 2, 10), np.int32)
    mask[0, 0, 2:8] = 1  # chosen: 6 completion tokens
    mask[0, 1, 3:6] = 1  # rejected: 3
    mask[1, 0, 1:3] = 1  # equal lengths: no tail
    mask[1, 1, 5:7] = 1
    got = np.asarray(length_desensitised_mask(jnp.asarray(mask), 0.25))
    want = mask.astype(np.float64)
    want[0, 0, 5:8] = 0.25  # the 3 tokens past the shared length 3
    np.testing.assert_array_equal(got, want)


def test_log_sum_sq_of_the_chunked_pass_equals_the_full_logits():
    from mmpo_jax.logprobs import token_logps_chunked

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 11, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(8, 37)) * 2.0, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 37, (3, 11)))
    logps, sum_sq = token_logps_chunked(hidden, kernel, targets, chunk=4, with_log_sum_sq=True)
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(sum_sq), np.log((p ** 2).sum(-1)), rtol=1e-5, atol=1e-5)
    # no gradient flows through it, and the log-probs' gradient is unchanged by asking for it
    g = jax.grad(lambda h: jnp.sum(token_logps_chunked(h, kernel, targets, chunk=4, with_log_sum_sq=True)[1]))(hidden)
    assert not np.any(np.asarray(g))
    g_with = jax.grad(lambda h: jnp.sum(token_logps_chunked(h, kernel, targets, chunk=4, with_log_sum_sq=True)[0]))(
        hidden)
    g_without = jax.grad(lambda h: jnp.sum(token_logps_chunked(h, kernel, targets, chunk=4)))(hidden)
    np.testing.assert_array_equal(np.asarray(g_with), np.asarray(g_without))


def test_the_precomputed_reference_cache_keys_on_the_reduction():
    from mmpo_jax.train.reference_cache import cache_key

    class _Data:  # what data_fingerprint reads is not under test here
        pass

    import mmpo_jax.train.reference_cache as rc

    keys = {}
    original = rc.data_fingerprint
    rc.data_fingerprint = lambda data: "same"
    try:
        for label, overrides in {"plain": [], "ld": ["loss.ld_alpha=0.5"], "ld2": ["loss.ld_alpha=0.25"],
                                 "average": ["loss.average_logps=true"]}.items():
            cfg = load_config(None, ["loss.name=dpo", "model.reference=precomputed", *overrides])
            keys[label] = cache_key(cfg, _Data())
    finally:
        rc.data_fingerprint = original
    assert len(set(keys.values())) == 4, keys


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "exo_pair"}, "label_smoothing: loss_type exo_pair needs label_smoothing > 0"),
    ({"loss_type": "sigmoidd"}, "loss_type: choose from sigmoid, hinge"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights: needs one weight per"),
    ({"loss_type": "aot", "f_divergence_type": "js_divergence"}, "f_divergence_type: does not apply to loss_type aot"),
    ({"loss_type": "aot_unpaired", "pair_weights": jnp.ones(4)}, "use_weighting: does not apply to loss_type"),
])
def test_dpo_loss_refuses_what_the_config_refuses(kwargs, match):
    """A library caller of dpo_loss meets the config's own rules (one copy: declarations.dpo_type_problem)."""
    lp = jnp.zeros(4)
    with pytest.raises(ValueError, match=match):
        jl.dpo_loss(lp, lp, lp, lp, beta=0.1, **kwargs)
