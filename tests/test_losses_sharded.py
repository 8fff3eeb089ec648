"""Global statistics across devices: shard_map over 8 simulated CPU devices.

Each device holds a slice of the pairs; `axis_name=("data", "fsdp")` must give
the loss, metrics and gradients of the single-device call on the whole batch.
A negative control shows the check catches per-device normalisation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmpo_jax.losses import mmpo as losses
from mmpo_jax.config_schema import MeshConfig
from mmpo_jax.sharding import BATCH_AXES, make_mesh

RTOL = 1e-6
N_PAIRS = 32


def _mesh(data, fsdp):
    assert jax.device_count() == 8, "conftest must set 8 simulated devices"
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=1))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    # Spread the reference log-probs so that each device's local min/max differ
    # from the global ones (otherwise per-device normalisation would look right).
    rc = -rng.uniform(5, 300, N_PAIRS).astype(np.float32)
    rr = -rng.uniform(5, 300, N_PAIRS).astype(np.float32)
    # Policy scores of a pair within ~1 of each other, so the sigmoid weights of
    # Theorem 3.2 are not saturated and the normalised rewards move the gradient.
    # Policy log-probs small next to the reference spread so that the loss value
    # itself, not only its gradient, depends visibly on the normalisation.
    pc = -rng.uniform(1, 5, N_PAIRS).astype(np.float32)
    pr = (pc + rng.normal(0, 0.5, N_PAIRS)).astype(np.float32)
    entropy = rng.uniform(0, 4, N_PAIRS).astype(np.float32)
    mask = (rng.uniform(size=N_PAIRS) < 0.8).astype(np.float32)
    return [jnp.asarray(x) for x in (pc, pr, rc, rr)], jnp.asarray(entropy), jnp.asarray(mask)


CASES = {
    "mmpo": (losses.mmpo_loss, dict(beta=0.1)),
    "mmpo_aux0": (losses.mmpo_loss, dict(beta=0.1, aux_weight=0.0)),
    "mmpo_entropy_none": (losses.mmpo_loss, dict(beta=0.5, aux_weight=0.3, normalize="none",
                                                 entropy_weight=0.1)),
    "dpo": (losses.dpo_loss, dict(beta=0.1, label_smoothing=0.1)),
    "simpo": (losses.simpo_loss, dict(beta=2.0, gamma=1.0)),
}


def _loss_fn(name, axis_name):
    fn, kw = CASES[name]

    def f(pc, pr, rc, rr, entropy, mask):
        extra = {"entropy": entropy} if "entropy_weight" in kw else {}
        if fn is losses.simpo_loss:
            return fn(pc / 50.0, pr / 50.0, pair_mask=mask, axis_name=axis_name, **kw)
        return fn(pc, pr, rc, rr, pair_mask=mask, axis_name=axis_name, **extra, **kw)

    return f


def _value_and_grad(f):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))


def _sharded(f, mesh):
    spec = P(BATCH_AXES)
    return jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 6, out_specs=(P(), P()))


def _max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compare(single, sharded):
    (l1, m1), g1 = single
    (l2, m2), g2 = sharded
    errs = {"loss": _max_rel(l2, l1)}
    for k in m1:
        errs[k] = _max_rel(m2[k], m1[k])
    for i in range(4):
        errs[f"grad{i}"] = _max_rel(g2[i], g1[i])
    return errs


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (4, 2)], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_shard_map_equals_single_device(name, shape):
    mesh = _mesh(*shape)
    xs, entropy, mask = _inputs()
    single = _value_and_grad(_loss_fn(name, None))(*xs, entropy, mask)
    sharded = _value_and_grad(_sharded(_loss_fn(name, BATCH_AXES), mesh))(*xs, entropy, mask)
    errs = _compare(single, sharded)
    bad = {k: v for k, v in errs.items() if v > RTOL}
    assert not bad, bad
    # the gradient of a sharded input comes back sharded over the batch axes
    expected = jax.sharding.NamedSharding(mesh, P(BATCH_AXES))
    assert sharded[1][0].sharding.is_equivalent_to(expected, 1)


def _per_device_mmpo(pc, pr, rc, rr, entropy, mask):
    """The bug the global statistics exist to prevent: min/max of the local slice only."""
    per_pair_sum, _ = losses.mmpo_loss(pc, pr, rc, rr, beta=0.1, aux_weight=0.0, pair_mask=mask)
    count = jnp.sum(mask)
    total = jax.lax.psum(per_pair_sum * count, BATCH_AXES)
    loss = total / jax.lax.psum(count, BATCH_AXES)
    return loss, {}


def test_negative_control_per_device_normalisation_is_caught():
    mesh = _mesh(2, 4)
    xs, entropy, mask = _inputs()
    single = _value_and_grad(_loss_fn("mmpo_aux0", None))(*xs, entropy, mask)
    buggy = _value_and_grad(_sharded(_per_device_mmpo, mesh))(*xs, entropy, mask)
    (l1, _), g1 = single
    (l2, _), g2 = buggy
    # The per-device version is a correct mean of local losses (its counts are
    # global), so only the normalisation differs, and the comparison must see it.
    assert _max_rel(l2, l1) > 100 * RTOL
    assert max(_max_rel(g2[i], g1[i]) for i in range(2)) > 100 * RTOL


def test_every_device_contributes_to_min_max():
    """Put the global extreme reward on the last device only: the range must see it."""
    mesh = _mesh(8, 1)
    n = 16
    rc = jnp.full((n,), -10.0).at[-1].set(-500.0)
    rr = jnp.full((n,), -10.0)
    pc = pr = jnp.full((n,), -5.0)
    fn = functools.partial(losses.mmpo_loss, beta=1.0, axis_name=BATCH_AXES)
    sharded = jax.shard_map(
        lambda *a: fn(*a)[1]["mmpo/reward_range"], mesh=mesh, in_specs=(P(BATCH_AXES),) * 4,
        out_specs=P(),
    )
    # rewards: 1 + (-10) = -9, 1 + (-500) = -499, 0.1 - 10 = -9.9 -> range 490
    np.testing.assert_allclose(float(jax.jit(sharded)(pc, pr, rc, rr)), 490.0, rtol=1e-6)
