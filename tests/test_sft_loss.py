"""The `sft` loss: JAX against the independent PyTorch reference, padding pairs, global
statistics, the contract's MMPO identity, the config, and a short training run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmpo_jax.losses import mmpo as jl
from mmpo_jax.config import load_config
from mmpo_jax.config_schema import ConfigError, MeshConfig
from mmpo_jax.losses.inputs import LossInputs
from mmpo_jax.losses.registry import configured_loss
from mmpo_jax.sharding import BATCH_AXES, make_mesh

torch = pytest.importorskip("torch")

from mmpo_jax.torch_ref import losses as tl  # noqa: E402


def _inputs(n, scale, seed, masked=False):
    """Sequence-sum log-probs `[n]` of completions of 1..60 tokens, reference included."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 61, n).astype(np.float64)
    data = {
        "policy_chosen_logps": -scale * rng.uniform(0.1, 1.0, n) * tokens,
        "policy_rejected_logps": -scale * rng.uniform(0.1, 1.0, n) * tokens,
        "ref_chosen_logps": -scale * rng.uniform(0.1, 1.0, n) * tokens,
        "ref_rejected_logps": -scale * rng.uniform(0.1, 1.0, n) * tokens,
    }
    mask = np.ones(n)
    if masked:
        mask = (rng.uniform(size=n) < 0.6).astype(np.float64)
        mask[0] = 1.0
    return data, tokens, mask


def _jax(data, kwargs, dtype):
    names = list(data)

    def f(*xs):
        return jl.sft_loss(*xs, **kwargs)

    (loss, metrics), grads = jax.value_and_grad(f, argnums=tuple(range(len(names))), has_aux=True)(
        *[jnp.asarray(data[k], dtype) for k in names])
    return float(loss), {k: float(v) for k, v in metrics.items()}, [np.asarray(g, np.float64) for g in grads]


def _torch(data, kwargs, dtype):
    xs = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in data.values()]
    loss, metrics = tl.sft_loss(*xs, **kwargs)
    loss.backward()
    # an input the loss does not read gets no .grad at all: its gradient is 0
    grads = [np.zeros(x.shape) if x.grad is None else x.grad.double().numpy() for x in xs]
    return float(loss.detach()), {k: float(v.detach()) for k, v in metrics.items()}, grads


@pytest.mark.parametrize("with_tokens", [True, False], ids=["token_mean", "pair_mean"])
@pytest.mark.parametrize("with_ref", [False, True], ids=["no_ref", "ref"])
@pytest.mark.parametrize("masked", [False, True], ids=["all_real", "masked"])
@pytest.mark.parametrize("n,scale", [(1, 1.0), (7, 3.0), (64, 0.5)])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_sft_matches_torch(with_tokens, with_ref, masked, n, scale, precision):
    data, tokens, mask = _inputs(n, scale, seed=n, masked=masked)
    if not with_ref:
        data = {k: data[k] for k in ("policy_chosen_logps", "policy_rejected_logps")}
    jdtype, tdtype, rtol = ((jnp.float64, torch.float64, 1e-10) if precision == "float64"
                            else (jnp.float32, torch.float32, 1e-6))
    with jax.enable_x64(precision == "float64"):
        jk = dict(beta=0.3, pair_mask=jnp.asarray(mask, jdtype),
                  chosen_tokens=jnp.asarray(tokens, jdtype) if with_tokens else None)
        jloss, jmet, jgrads = _jax(data, jk, jdtype)
    tk = dict(beta=0.3, pair_mask=torch.tensor(mask, dtype=tdtype),
              chosen_tokens=torch.tensor(tokens, dtype=tdtype) if with_tokens else None)
    tloss, tmet, tgrads = _torch(data, tk, tdtype)
    assert jloss == pytest.approx(tloss, rel=rtol, abs=1e-300)
    assert set(jmet) == set(tmet) >= {"loss", "logps/chosen", "logps/rejected"}
    assert ("rewards/accuracies" in jmet) == with_ref
    for k in tmet:
        assert jmet[k] == pytest.approx(tmet[k], rel=rtol, abs=rtol), k
    scale_g = max(float(np.max(np.abs(g))) for g in tgrads)
    for i, (jg, tg) in enumerate(zip(jgrads, tgrads)):
        np.testing.assert_allclose(jg, tg, rtol=0, atol=rtol * scale_g, err_msg=f"gradient of input {i}")
    # the loss is the NLL of the chosen answers alone: nothing reaches the rejected or the reference
    for g in jgrads[1:]:
        assert not np.any(g)
    # and its value is the normalisation the docstring states
    real = mask > 0
    pc = data["policy_chosen_logps"]
    want = -pc[real].sum() / tokens[real].sum() if with_tokens else -pc[real].mean()
    assert jloss == pytest.approx(want, rel=rtol)


def test_masked_pairs_contribute_nothing():
    data, tokens, _ = _inputs(10, 2.0, seed=3)
    mask = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0], np.float32)
    keep = mask > 0
    poisoned = {k: np.where(keep, v, np.nan) for k, v in data.items()}  # padding pairs hold NaN
    bad_tokens = np.where(keep, tokens, np.inf)
    for with_tokens in (True, False):
        kw = dict(beta=0.1, pair_mask=jnp.asarray(mask))
        full = _jax(poisoned, {**kw, "chosen_tokens": jnp.asarray(bad_tokens) if with_tokens else None},
                    jnp.float32)
        kept = _jax({k: v[keep] for k, v in data.items()},
                    dict(beta=0.1, chosen_tokens=jnp.asarray(tokens[keep]) if with_tokens else None),
                    jnp.float32)
        assert full[0] == pytest.approx(kept[0], rel=1e-6)
        assert full[1] == pytest.approx(kept[1], rel=1e-6)
        for g_full, g_kept in zip(full[2], kept[2]):
            assert np.all(g_full[~keep] == 0) and np.all(np.isfinite(g_full))
            np.testing.assert_allclose(g_full[keep], g_kept, rtol=1e-6)
    # no real pair at all: a finite loss of 0, no gradient
    loss, _, grads = _jax(data, dict(beta=0.1, pair_mask=jnp.zeros(10), chosen_tokens=jnp.asarray(tokens)),
                          jnp.float32)
    assert loss == 0.0 and not any(np.any(g) for g in grads)


@pytest.mark.parametrize("mmpo_opts", [
    dict(beta=0.1),
    dict(beta=0.7, reward_epsilon=2.0, rejected_epsilon=-0.5, normalize="none"),
    dict(beta=0.05, norm_eps=1e-3),
], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["all_real", "masked"])
def test_mmpo_with_aux_weight_1_is_sft_on_the_chosen(mmpo_opts, masked):
    """The contract's identity: with aux_weight = 1, loss_i = -s_w = -(pc + n_w), so the
    gradient is -1/N on every pc (N real pairs) and exactly 0 on every pr, whatever beta,
    the epsilons and the normalisation. That is the gradient of SFT with the pair-mean
    normalisation on sequence sums (sft_loss without chosen_tokens); SFT's token mean
    (TRL's, the step's default) has the same direction, scaled: grad_mmpo =
    (T / N) * grad_sft_token_mean, T the real pairs' chosen tokens."""
    data, tokens, mask = _inputs(12, 5.0, seed=11, masked=masked)
    names = list(data)
    with jax.enable_x64(True):
        xs = [jnp.asarray(data[k]) for k in names]
        pm = jnp.asarray(mask)

        def mmpo(pc, pr, rc, rr):
            return jl.mmpo_loss(pc, pr, rc, rr, aux_weight=1.0, pair_mask=pm, **mmpo_opts)

        def sft(pc, pr, tok=None):
            return jl.sft_loss(pc, pr, chosen_tokens=tok, pair_mask=pm)

        (m_loss, m_met), m_grads = jax.value_and_grad(mmpo, argnums=(0, 1, 2, 3), has_aux=True)(*xs)
        (s_loss, _), s_grads = jax.value_and_grad(sft, argnums=(0, 1), has_aux=True)(xs[0], xs[1])
        (_, _), t_grads = jax.value_and_grad(sft, argnums=(0, 1), has_aux=True)(
            xs[0], xs[1], jnp.asarray(tokens))
        m_grads = [np.asarray(g) for g in m_grads]
        s_grads = [np.asarray(g) for g in s_grads]
        t_grads = [np.asarray(g) for g in t_grads]

    real = mask > 0
    n = real.sum()
    t = tokens[real].sum()
    # the contract's numbers: -1/N on each real pc, 0 on pr (and on the padding pairs)
    np.testing.assert_allclose(m_grads[0], np.where(real, -1.0 / n, 0.0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m_grads[1], 0.0, atol=1e-15)
    # ... which is SFT's gradient with the pair mean, and T/N times SFT's token-mean gradient
    np.testing.assert_allclose(m_grads[0], s_grads[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s_grads[1], 0.0, atol=0)
    np.testing.assert_allclose(m_grads[0], (t / n) * t_grads[0], rtol=1e-12, atol=1e-15)
    # the value differs only by the reference-dependent constant: loss = mean_i(-pc_i - n_w_i)
    if mmpo_opts.get("normalize") == "none":
        n_w = mmpo_opts.get("reward_epsilon", 1.0) + mmpo_opts["beta"] * data["ref_chosen_logps"]
        assert float(m_loss) == pytest.approx(float(s_loss) - n_w[real].mean(), rel=1e-12)
    else:  # n_w is in (0, 1]
        assert 0.0 < float(s_loss) - float(m_loss) <= 1.0 + 1e-12


def test_token_mean_is_global_under_shard_map():
    """Under shard_map over 8 devices the token mean divides the global sums once:
    the single-device value and gradient, not a mean of per-device token means."""
    assert jax.device_count() == 8, "conftest must set 8 simulated devices"
    mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    data, tokens, mask = _inputs(32, 1.0, seed=5, masked=True)
    tokens[:4] = 200.0  # uneven token counts per device
    pc, pr = (jnp.asarray(data[k], jnp.float32) for k in ("policy_chosen_logps", "policy_rejected_logps"))
    tok, pm = jnp.asarray(tokens, jnp.float32), jnp.asarray(mask, jnp.float32)

    def sharded(pc, pr, tok, pm):
        fn = jax.shard_map(lambda *a: jl.sft_loss(a[0], a[1], chosen_tokens=a[2], pair_mask=a[3],
                                                  axis_name=BATCH_AXES),
                           mesh=mesh, in_specs=(P(BATCH_AXES),) * 4, out_specs=(P(), P()))
        return fn(pc, pr, tok, pm)

    (l8, m8), g8 = jax.jit(jax.value_and_grad(sharded, has_aux=True))(pc, pr, tok, pm)
    (l1, m1), g1 = jax.value_and_grad(
        lambda pc, pr, tok, pm: jl.sft_loss(pc, pr, chosen_tokens=tok, pair_mask=pm), has_aux=True)(pc, pr, tok, pm)
    assert float(l8) == pytest.approx(float(l1), rel=1e-6)
    for k in m1:
        assert float(m8[k]) == pytest.approx(float(m1[k]), rel=1e-6), k
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-6)


def test_config_sft_needs_no_reference_and_sums():
    cfg = load_config(None, ["loss.name=sft"])
    assert cfg.model.reference == "none"
    assert cfg.loss.average_logps is False  # sums: the step can form the token mean
    assert cfg.loss.beta == 0.1
    # LoRA does not change it (auto would give lora_base for a loss that needs a reference)
    assert load_config(None, ["loss.name=sft", "model.lora.rank=4"]).model.reference == "none"
    # an explicit reference is allowed (its rewards/* metrics)
    assert load_config(None, ["loss.name=sft", "model.reference=separate"]).model.reference == "separate"
    assert load_config(None, ["loss.name=sft", "loss.average_logps=true"]).loss.average_logps is True
    with pytest.raises(ConfigError, match=r"loss.name.*mmpo, dpo, simpo, sft.*Did you mean 'sft'"):
        load_config(None, ["loss.name=sfft"])
    with pytest.raises(ConfigError, match=r"loss.name=dpo needs reference log-probs.*simpo and sft"):
        load_config(None, ["loss.name=dpo", "model.reference=none"])


def test_configured_loss_reads_the_token_counts_by_the_config():
    """The token mean needs sequence sums: with `average_logps` the counts are not read,
    and a loss that is not token-mean ignores them."""
    cfg = load_config(None, ["loss.name=sft"]).loss
    pc, pr, tok = jnp.array([-10.0, -20.0]), jnp.array([-5.0, -6.0]), jnp.array([5.0, 5.0])
    loss, metrics = configured_loss(cfg, LossInputs(pc, pr, chosen_tokens=tok))
    assert float(loss) == pytest.approx(3.0) and set(metrics) == {"loss", "logps/chosen", "logps/rejected"}
    loss, _ = configured_loss(cfg, LossInputs(pc, pr))
    assert float(loss) == pytest.approx(15.0)
    averaged = load_config(None, ["loss.name=sft", "loss.average_logps=true"]).loss
    loss, _ = configured_loss(averaged, LossInputs(pc, pr, chosen_tokens=tok))
    assert float(loss) == pytest.approx(15.0)  # the mean of the per-sequence means, counts unread
    dpo = load_config(None, ["loss.name=dpo"]).loss
    with_counts, _ = configured_loss(dpo, LossInputs(pc, pr, pc, pr, chosen_tokens=tok))
    without, _ = configured_loss(dpo, LossInputs(pc, pr, pc, pr))
    assert float(with_counts) == float(without)
    with pytest.raises(ValueError, match="'dpo' needs reference log-probs"):
        configured_loss(dpo, LossInputs(pc, pr))


def test_losses_command_shows_sft(capsys):
    from mmpo_jax import cli

    assert cli.main(["losses", "loss.name=sft"]) == 0
    out = capsys.readouterr().out
    assert "== sft on the example batch" in out and "token-mean NLL" in out
    assert cli.main(["losses", "--all", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {"mmpo", "dpo", "simpo", "sft", "cpo", "orpo", "dpo:ipo", "dpo:sigmoid+sft"} <= set(got)
    assert got["sft"]["loss"] == pytest.approx(-got["sft"]["logps/chosen"] / 40.0, rel=1e-6)


def test_sft_training_lowers_the_chosen_nll(tmp_path):
    """configs/tiny.yaml with loss.name=sft: the step's loss is the token-mean NLL of the
    chosen answers (checked against the model's full logits), and a few steps lower it."""
    from mmpo_jax.data.builtin import load_demo_rows
    from mmpo_jax.data.batches import train_batches
    from mmpo_jax.train.run_data import load_data
    from mmpo_jax.data.layout import device_batch
    from mmpo_jax.train.setup import build_trainer

    rows = load_demo_rows("train", "conversational")[:8]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("configs/tiny.yaml", [
        "loss.name=sft", f"data.train_files={path}", "data.test_files=null", "mesh.data=1",
        "optim.warmup_steps=0", "optim.schedule=constant", "train.max_steps=4",
        f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.model.reference == "none"
    data = load_data(cfg)
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    host = train_batches(data.train, cfg.data.batch_size, cfg.data.seed)[0]
    batch = device_batch(host, trainer.mesh)

    # the token-mean NLL of the chosen answers from the full logits (before the state is donated)
    ids = np.asarray(host.input_ids)[:, 0]
    mask = np.asarray(host.loss_mask)[:, 0].astype(np.float64)
    real = np.asarray(host.pair_mask) > 0
    from flax import nnx

    graphdef, params = nnx.split(trainer.sdef.policy(trainer.state))

    @jax.jit  # one compile of the plain forward (op-by-op is slower here)
    def full_logits(params, ids):
        model = nnx.merge(graphdef, params)
        return model(ids) @ model.lm_head_kernel()

    logits = np.asarray(full_logits(params, jnp.asarray(ids)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    token_logp = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]  # predicts token t+1
    chosen = (token_logp * mask[:, 1:])[real]
    want = -chosen.sum() / mask[real, 1:].sum()

    state, history = trainer.state, []
    for _ in range(cfg.train.max_steps):
        state, metrics = trainer.train_step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[0]["loss"] == pytest.approx(want, rel=1e-4)
    assert "rewards/accuracies" not in history[0]  # no reference, no implicit rewards
    losses = [h["loss"] for h in history]
    assert all(h["nonfinite"] == 0 for h in history)
    assert losses[-1] < losses[0] - 0.05, losses
    assert history[-1]["logps/chosen"] > history[0]["logps/chosen"]
