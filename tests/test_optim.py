"""The optimizer against PyTorch: transformers' schedules and torch.optim.AdamW with clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.config import load_config
from mmpo_jax.train.optim import learning_rate_schedule, make_optimizer

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_matches_transformers(schedule, warmup):
    import transformers

    total = 12
    cfg = load_config(None, [f"optim.schedule={schedule}", f"optim.warmup_steps={warmup}",
                             "optim.learning_rate=2e-3"]).optim
    ours = [float(learning_rate_schedule(cfg, total)(k)) for k in range(total)]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-3)
    make = {
        "cosine": transformers.get_cosine_schedule_with_warmup,
        "linear": transformers.get_linear_schedule_with_warmup,
        "constant": lambda o, w, t: transformers.get_constant_schedule_with_warmup(o, w),
    }[schedule]
    sched = make(opt, warmup, total)
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # float32 cosine: absolute error relative to the peak rate
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6 * 2e-3)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_adamw_steps_match_torch(max_grad_norm):
    cfg = load_config(None, [
        "optim.learning_rate=1e-2", "optim.warmup_steps=1", "optim.weight_decay=0.1",
        f"optim.max_grad_norm={max_grad_norm}", "optim.schedule=linear",
    ]).optim
    total = 4
    rng = np.random.default_rng(0)
    w0 = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(5,))}
    grads_seq = [{k: rng.normal(size=v.shape) for k, v in w0.items()} for _ in range(total)]

    opt = make_optimizer(cfg, total)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in w0.items()}
    state = opt.init(params)
    for g in grads_seq:
        updates, state = opt.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)

    import transformers

    tparams = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for k, v in w0.items()}
    topt = torch.optim.AdamW(list(tparams.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.1)
    tsched = transformers.get_linear_schedule_with_warmup(topt, 1, total)
    for g in grads_seq:
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k], dtype=torch.float32)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(tparams.values()), max_grad_norm)
        topt.step()
        tsched.step()
    for k in w0:
        np.testing.assert_allclose(np.asarray(params[k]), tparams[k].detach().numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=k)
    # and the parameters did move (the comparison is not of two no-ops)
    assert np.max(np.abs(np.asarray(params["a"]) - w0["a"])) > 1e-3
