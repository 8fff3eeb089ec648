"""The loss declarations are the one description of each loss: its functions (JAX, bound
in the registry, and the PyTorch twin) take what it declares, return the metrics it names,
and agree with each other through the one binding; the config, docs and CLI follow it."""

from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from mmpo_jax.losses import declarations as D
from mmpo_jax.losses import registry as R
from mmpo_jax.config import load_config
from mmpo_jax.losses.inputs import LossInputs

torch = pytest.importorskip("torch")
from mmpo_jax.torch_ref import losses as tl  # noqa: E402
from mmpo_jax.torch_ref.step import configured_loss as torch_configured_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", D.LOSS_NAMES)
def test_both_functions_take_what_the_declaration_says(name):
    spec = D.DECLARATIONS[name]
    assert R.LOSSES[name].declaration is spec
    for fn in (R.LOSSES[name].function, tl.LOSS_FUNCTIONS[name]):
        params = inspect.signature(fn).parameters
        keywords = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
        positional = [p for p, v in params.items() if v.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert set(spec.options) <= keywords, (fn, spec.options, keywords)
        assert ("entropy" in keywords) == spec.entropy
        for count in ("chosen_tokens", "rejected_tokens"):
            assert (count in keywords) == (count in spec.token_counts), (fn, count)
        assert ("averaged" in keywords) == spec.reads_averaged
        assert ("chosen_sequence_logps" in keywords) == spec.sequence_nll
        assert {"beta", "pair_mask"} <= keywords
        # reference log-probs are the 3rd and 4th arguments exactly when the loss may read them
        assert len(positional) == (2 if spec.reference_use == "unused" else 4), positional


def _inputs(rng, pairs, *, reference, entropy, tokens, module):
    """Random `[pairs]` inputs with a padding pair holding NaN, as JAX or torch arrays."""
    pc, pr, rc, rr = (rng.uniform(-60, -5, pairs) for _ in range(4))
    mask = np.ones(pairs)
    mask[-1] = 0.0
    pc[-1] = np.nan
    ent = rng.uniform(0.5, 3.0, pairs)
    tok = rng.integers(3, 30, (pairs,)).astype(np.float64)
    seq, seq_tok = rng.uniform(-300, -50, pairs), tok + rng.integers(5, 40, (pairs,))
    conv = {"jax": jax.numpy.asarray, "torch": torch.as_tensor, "np": np.asarray}[module]
    return LossInputs(
        conv(pc), conv(pr), conv(rc) if reference else None, conv(rr) if reference else None,
        chosen_tokens=conv(tok) if tokens else None, rejected_tokens=conv(tok) if tokens else None,
        entropy=conv(ent) if entropy else None, pair_mask=conv(mask),
        chosen_sequence_logps=conv(seq), chosen_sequence_tokens=conv(seq_tok),
    )


def _cases():
    for name, spec in D.DECLARATIONS.items():
        refs = {"required": [True], "metrics_only": [False, True], "unused": [False, True]}[spec.reference_use]
        ents = [False, True] if spec.entropy else [False]
        for reference, entropy in itertools.product(refs, ents):
            yield name, reference, entropy


@pytest.mark.parametrize("name,reference,entropy", list(_cases()))
def test_metrics_are_the_declared_ones_and_jax_equals_torch(name, reference, entropy):
    overrides = [f"loss.name={name}"] + (["loss.entropy_weight=0.3"] if entropy else [])
    cfg = load_config(None, overrides).loss
    jax_in = _inputs(np.random.default_rng(0), 7, reference=reference, entropy=entropy, tokens=True, module="np")
    torch_in = _inputs(np.random.default_rng(0), 7, reference=reference, entropy=entropy, tokens=True,
                       module="torch")
    with jax.enable_x64(True):
        jax_in = jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x), jax.numpy.float64), jax_in)
        loss, metrics = R.configured_loss(cfg, jax_in)
        metrics = {k: float(v) for k, v in metrics.items()}
        loss = float(loss)
    t_loss, t_metrics = torch_configured_loss(cfg, torch_in)
    spec = D.DECLARATIONS[name]
    expected = spec.metric_names(reference=reference and spec.reference_use != "unused", entropy=entropy)
    assert list(metrics) == list(expected)
    assert list(t_metrics) == list(expected)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), float(t_loss), rtol=1e-10)
    for key in expected:
        np.testing.assert_allclose(metrics[key], float(t_metrics[key]), rtol=1e-10, atol=1e-12,
                                   err_msg=key)


def test_a_required_reference_is_checked():
    cfg = load_config(None, ["loss.name=mmpo"]).loss
    inputs = _inputs(np.random.default_rng(1), 4, reference=False, entropy=False, tokens=False, module="jax")
    with pytest.raises(ValueError, match="'mmpo' needs reference log-probs"):
        R.configured_loss(cfg, inputs)


def test_used_inputs_keeps_only_what_the_loss_reads():
    full = _inputs(np.random.default_rng(2), 4, reference=True, entropy=True, tokens=True, module="jax")
    simpo = R.bind_loss(load_config(None, ["loss.name=simpo"]).loss).used(full)
    assert simpo.ref_chosen is None and simpo.chosen_tokens is None and simpo.entropy is None
    sft = R.bind_loss(load_config(None, ["loss.name=sft"]).loss).used(full)
    assert sft.ref_chosen is not None and sft.chosen_tokens is not None and sft.rejected_tokens is None
    mmpo = R.bind_loss(load_config(None, ["loss.entropy_weight=0.1"]).loss).used(full)
    assert mmpo.entropy is not None and mmpo.chosen_tokens is None
    assert len(jax.tree.leaves(mmpo)) == 6  # pc, pr, rc, rr, entropy, pair_mask


def test_the_config_reads_its_choices_and_defaults_from_the_registry():
    # the contract's defaults (docs/losses.md), written out here as the independent statement
    contract = {"mmpo": (0.1, False), "dpo": (0.1, False), "simpo": (2.0, True), "sft": (0.1, False),
                "cpo": (0.1, False), "orpo": (0.1, True)}
    assert set(contract) == set(D.LOSS_NAMES)
    for name, (beta, average) in contract.items():
        lc = load_config(None, [f"loss.name={name}"]).loss
        assert (lc.beta, lc.average_logps) == (beta, average), name
    assert D.REFERENCE_FREE_LOSSES == ("simpo", "sft", "cpo", "orpo")
    with pytest.raises(Exception, match="SimPO always uses length-averaged"):
        load_config(None, ["loss.name=simpo", "loss.average_logps=false"])


def test_docs_define_every_registered_loss():
    doc = (ROOT / "docs" / "losses.md").read_text()
    for name, spec in D.DECLARATIONS.items():
        assert f"`loss.name: {name}`" in doc, name
        for key in spec.config_keys:
            if key not in ("name", "beta", "average_logps"):
                assert f"`{key}`" in doc, (name, key)


def test_losses_all_runs_every_registered_loss(capsys):
    from mmpo_jax import cli

    assert cli.main(["losses", "--all", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = list(D.LOSS_NAMES) + [f"dpo:{k}" for k in D.DPO_LOSS_TYPES if k != "sigmoid"]
    expected += [f"cpo:{k}" for k in D.CPO_LOSS_TYPES if k != "sigmoid"] + ["dpo:sigmoid+sft"]
    assert list(got) == expected
    for label, metrics in got.items():
        assert all(np.isfinite(v) for v in metrics.values()), label
    assert got["dpo:sigmoid+sft"]["loss"] == pytest.approx(
        got["dpo"]["loss"] + got["dpo:sigmoid+sft"]["loss/sft"], rel=1e-6)


def test_every_declared_loss_has_both_functions():
    assert tuple(R.LOSSES) == D.LOSS_NAMES == tuple(tl.LOSS_FUNCTIONS)


def test_the_declarations_and_the_config_import_no_jax():
    """The config and the CLI read the declarations and the binding without loading jax or torch."""
    import subprocess
    import sys

    code = ("import sys, mmpo_jax.config, mmpo_jax.losses.declarations, mmpo_jax.losses.binding; "
            "print(','.join(m for m in ('jax', 'flax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_step_binds_its_loss_once(monkeypatch):
    """A `StepConfig` binds its loss when made; tracing the loss on a micro-batch reads no config."""
    from mmpo_jax.losses import binding
    from mmpo_jax.train.step import StepConfig

    cfg = load_config(None, ["loss.name=sft"]).loss
    scfg = StepConfig(loss=cfg, grad_accum=1, logprob_chunk=None, schedule=lambda step: step, dropout=False)
    assert scfg.bound_loss.declaration is D.DECLARATIONS["sft"] and scfg.bound_loss.function is R.LOSSES["sft"].function
    monkeypatch.setattr(binding, "declaration_of", lambda name: pytest.fail("bound again"))
    full = _inputs(np.random.default_rng(3), 4, reference=True, entropy=False, tokens=True, module="jax")
    loss, _ = scfg.bound_loss(scfg.bound_loss.used(full))
    assert np.isfinite(float(loss))
