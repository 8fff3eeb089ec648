"""TR-DPO reference updates (`model.sync_reference`, TRL's `sync_ref_model`): the step
mixes the policy into the reference every N steps by TRL's formula, a resumed run is
still exact (the reference is in the checkpoint), and the modes it cannot apply to stop
at start."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mmpo_jax.cli import main
from mmpo_jax.config import load_config
from mmpo_jax.config_schema import ConfigError, MeshConfig
from mmpo_jax.data.layout import DeviceBatch
from mmpo_jax.models.build import build_model
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.options import ModelOptions
from mmpo_jax.sharding import make_mesh
from mmpo_jax.train.optim import learning_rate_schedule, make_optimizer
from mmpo_jax.train.reference import reference_mode
from mmpo_jax.train.state import create_state, state_shardings
from mmpo_jax.train.step import StepConfig, make_train_step

ARCH = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2)
EVERY, ALPHA = 2, 0.6


def _leaves(tree) -> list[np.ndarray]:
    return [np.array(x, np.float64) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_the_reference_is_mixed_toward_the_policy_every_n_steps():
    cfg = load_config(None, ["loss.name=dpo", "optim.learning_rate=1e-2", "optim.warmup_steps=0"])
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    model = build_model(ARCH, ModelOptions(scan_layers=True, remat="none"), mesh=mesh, seed=0, init_scale=0.5)
    opt = make_optimizer(cfg.optim, 10)
    sdef, state = create_state(model, opt, lora=False, reference_mode=reference_mode("separate"), mesh=mesh)
    scfg = StepConfig(loss=cfg.loss, grad_accum=1, logprob_chunk=8, schedule=learning_rate_schedule(cfg.optim, 10),
                      dropout=False, reference_sync=(EVERY, ALPHA))
    rng = np.random.default_rng(0)
    batch = DeviceBatch(input_ids=rng.integers(1, ARCH.vocab_size, (4, 2, 12)).astype(np.int32),
                        loss_mask=np.tile((np.arange(12) >= 5).astype(np.int32), (4, 2, 1)))
    step = make_train_step(sdef, scfg, opt, mesh, state_shardings(state), batch)
    reference, history = _leaves(state.reference), []
    for k in range(1, 6):
        state, _ = step(state, batch)
        policy, new_reference = _leaves(state.trainable), _leaves(state.reference)
        if k % EVERY == 0:  # TRL: target = (1 - alpha) target + alpha policy, after the update
            expected = [(1 - ALPHA) * r + ALPHA * p for r, p in zip(reference, policy)]
        else:
            expected = reference
        for got, want in zip(new_reference, expected):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        history.append(max(float(np.max(np.abs(a - b))) for a, b in zip(new_reference, reference)))
        reference = new_reference
    assert history[0] == history[2] == 0.0 and history[1] > 0 and history[3] > 0  # it moved, at 2 and 4


def _train(out, *overrides):
    args = ["train", "configs/tiny.yaml", f"train.output_dir={out}", "loss.name=dpo", "data.test_files=null",
            "train.eval_every=0", "train.save_every=3", "model.reference_sync_steps=2", *overrides]
    assert main(args) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_a_resumed_tr_dpo_run_is_exact(tmp_path, capsys):
    """Steps 4-6 again from the step-3 checkpoint (the last one removed, as after a crash)
    equal the straight run's: the synced reference comes back from the checkpoint (one
    rebuilt from the initial weights would change every reward after step 2)."""
    import shutil

    run = tmp_path / "run"
    straight = _train(run, "train.max_steps=6", "model.sync_reference=true")
    shutil.rmtree(run / "checkpoints" / "6")
    capsys.readouterr()
    resumed = _train(run, "train.max_steps=6", "model.sync_reference=true")
    assert "resuming from" in capsys.readouterr().out
    assert sorted(resumed) == list(range(1, 7))
    for k in (4, 5, 6):
        for key in ("loss", "rewards/chosen", "rewards/margins", "grad_norm"):
            assert resumed[k][key] == straight[k][key], (k, key)
    # the negative control: without the sync the rewards after step 2 differ
    fixed = _train(tmp_path / "fixed", "train.max_steps=4")
    assert fixed[2]["loss"] == straight[2]["loss"]
    assert fixed[3]["rewards/chosen"] != straight[3]["rewards/chosen"]


@pytest.mark.parametrize("overrides,match", [
    (["model.reference=lora_base", "model.lora.rank=4"], "full fine-tuning only"),
    (["model.reference=precomputed"], "precomputed log-probs are of a fixed reference"),
    (["loss.name=simpo"], "needs model.reference=separate .it is none"),
    (["model.lora.rank=4", "model.reference=separate"], "full fine-tuning only"),
    (["model.reference_mixup_alpha=1.5"], "reference_mixup_alpha=1.5: must be in"),
    (["model.reference_sync_steps=0"], "reference_sync_steps=0: must be >= 1"),
])
def test_modes_it_cannot_apply_to_stop_at_start(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["loss.name=dpo", "model.sync_reference=true", *overrides])
