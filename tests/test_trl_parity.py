"""Against TRL itself: TRL 1.16's `DPOTrainer.evaluate()` for every DPO loss type and a
mixture, and `trl.experimental.cpo` / `orpo`'s `evaluate()`, beside `mmpo-jax eval` on
the same tiny random Llama, reference, data and options (float32, CPU).

The eval set (16 pairs) is two full batches of 8 on both sides: TRL averages per-batch
means, ours weighs batches by their real pairs, equal for full batches. Ours runs on 8
simulated devices (one pair each), so `aot`'s sort and `sft`'s token mean are global
there, as TRL's are over its one process's batch.

TRL's ORPO / CPO tokenize on their own (a BOS prepended to prompts that lack it, the
prompt and answer tokenized jointly): the prompts begin with the BOS token and end with
a newline, so their ids are ours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

sys.path.insert(0, str(Path(__file__).parent))
from checkpoint_helpers import CORPUS, make_tokenizer, random_torch_model, save_hf_dir  # noqa: E402

from mmpo_jax import cli  # noqa: E402
from mmpo_jax.losses import declarations as R  # noqa: E402

RTOL = 1e-5
BATCH = 8
QUESTIONS = ["What is the capital of France?", "Explain why the sky is blue.", "Write a haiku about the sea.",
             "Give me three tips for learning a new language.", "Say hello.", "Who jumps over the dog?",
             "What is 2024?", "Tell me about the fox."]

# (label, our loss.* overrides, TRL's trainer, TRL's config arguments)
DPO_CASES = [
    (f"dpo:{kind}", {"name": "dpo", "loss_type": kind, **({"label_smoothing": 0.01} if kind == "exo_pair" else {})},
     "dpo", {"loss_type": [kind], **({"label_smoothing": 0.01} if kind == "exo_pair" else {})})
    for kind in R.DPO_LOSS_TYPES
] + [
    ("dpo:sigmoid+sft", {"name": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]},
     "dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]}),
    ("dpo:robust+aot_unpaired", {"name": "dpo", "loss_type": ["robust", "aot_unpaired"], "label_smoothing": 0.2},
     "dpo", {"loss_type": ["robust", "aot_unpaired"], "label_smoothing": 0.2}),
    ("dpo:hinge,js", {"name": "dpo", "loss_type": "hinge", "f_divergence_type": "js_divergence"},
     "dpo", {"loss_type": ["hinge"], "f_divergence_type": "js_divergence"}),
    ("dpo:ipo,alpha", {"name": "dpo", "loss_type": "ipo", "f_divergence_type": "alpha_divergence",
                       "f_alpha_divergence_coef": 0.3},
     "dpo", {"loss_type": ["ipo"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("dpo:sigmoid,forward_kl", {"name": "dpo", "f_divergence_type": "forward_kl"},
     "dpo", {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"}),
    ("dpo:sigmoid,wpo", {"name": "dpo", "use_weighting": True}, "dpo", {"loss_type": ["sigmoid"], "use_weighting": True}),
    # (not with the sft type: TRL 1.16 multiplies its expanded scalar in place and raises)
    ("dpo:ipo+robust,wpo", {"name": "dpo", "loss_type": ["ipo", "robust"], "use_weighting": True,
                            "label_smoothing": 0.1},
     "dpo", {"loss_type": ["ipo", "robust"], "use_weighting": True, "label_smoothing": 0.1}),
    ("dpo:sigmoid,ld", {"name": "dpo", "ld_alpha": 0.5}, "dpo", {"loss_type": ["sigmoid"], "ld_alpha": 0.5}),
    ("dpo:sigmoid+sft,ld", {"name": "dpo", "loss_type": ["sigmoid", "sft"], "ld_alpha": 0.2},
     "dpo", {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.2}),
    ("dpo:ipo+bco_pair,ld,wpo", {"name": "dpo", "loss_type": ["ipo", "bco_pair"], "ld_alpha": 0.3,
                                 "use_weighting": True},
     "dpo", {"loss_type": ["ipo", "bco_pair"], "ld_alpha": 0.3, "use_weighting": True}),
    ("dpo:discopop,tau", {"name": "dpo", "loss_type": "discopop", "discopop_tau": 0.3, "beta": 0.2},
     "dpo", {"loss_type": ["discopop"], "discopop_tau": 0.3, "beta": 0.2}),
]
CPO_CASES = [
    ("cpo:sigmoid", {"name": "cpo"}, "cpo", {"loss_type": "sigmoid"}),
    ("cpo:hinge", {"name": "cpo", "loss_type": "hinge", "cpo_alpha": 0.5}, "cpo",
     {"loss_type": "hinge", "cpo_alpha": 0.5}),
    ("cpo:ipo", {"name": "cpo", "loss_type": "ipo"}, "cpo", {"loss_type": "ipo"}),
    ("cpo:simpo", {"name": "cpo", "loss_type": "simpo", "beta": 2.0, "gamma": 0.8, "label_smoothing": 0.1},
     "cpo", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.8, "label_smoothing": 0.1}),
    # AlphaPO on per-token means (simpo): on sequence sums TRL's exp(logp) underflows to 0 and
    # its reward 0 ** -alpha is inf (NaN loss); ours computes exp(-alpha logp), clamped
    ("cpo:alphapo", {"name": "cpo", "loss_type": "simpo", "alphapo_alpha": 0.25},
     "cpo", {"loss_type": "simpo", "alpha": 0.25}),
    ("orpo", {"name": "orpo"}, "orpo", {}),
    ("orpo:beta", {"name": "orpo", "beta": 0.5}, "orpo", {"beta": 0.5}),
]
CASES = DPO_CASES + CPO_CASES
# the metrics both report under the same names (TRL's ORPO/CPO add nll_loss, log_odds_*)
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")
EXTRA = {"orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen"), "cpo": ("nll_loss",)}


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2 * BATCH):
        chosen, rejected = rng.choice(len(CORPUS), 2, replace=False)
        # answers of different lengths, cut at a word, so ipo's and sft's token counts matter
        c_words, r_words = CORPUS[chosen].split(), CORPUS[rejected].split()
        rows.append({
            "prompt": f"<|im_start|>{QUESTIONS[i % len(QUESTIONS)]}\n",
            "chosen": " ".join(c_words[: 3 + i % 6]),
            "rejected": " ".join(r_words[: 2 + (i * 5) % 7]),
        })
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_parity")
    tok = make_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    policy = random_torch_model(seed=0, scale=0.1, **ids)
    reference = random_torch_model(seed=0, scale=0.1, **ids)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference near the policy: log-ratios of a few nats, sigmoids not saturated
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    save_hf_dir(policy, root / "policy", tok)
    save_hf_dir(reference, root / "reference", tok)
    rows = _rows()
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, tok, policy, reference, rows


def _trl_metrics(trainer_kind, options, setup) -> dict[str, float]:
    import datasets

    root, tok, policy, reference, rows = setup
    ds = datasets.Dataset.from_list(rows)
    common = dict(output_dir=str(root / "trl"), per_device_eval_batch_size=BATCH, report_to=[], use_cpu=True,
                  bf16=False, disable_tqdm=True)
    if trainer_kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, **{"beta": 0.1, **options})
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds, eval_dataset=ds,
                             processing_class=tok)
    elif trainer_kind == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, **options)
        trainer = CPOTrainer(model=policy, args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, **options)
        trainer = ORPOTrainer(model=policy, args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok)
    out = trainer.evaluate()
    return {k.removeprefix("eval_"): float(v) for k, v in out.items() if isinstance(v, (int, float))}


@pytest.fixture(scope="module")
def trl_results(setup):
    """Every case through TRL, in this one process."""
    return {label: _trl_metrics(kind, options, setup) for label, _, kind, options in CASES}


def _our_metrics(loss: dict, setup, capsys) -> dict[str, float]:
    root = setup[0]
    reference = "none" if loss["name"] in R.REFERENCE_FREE_LOSSES else "separate"
    config = {
        "model": {"path": str(root / "policy"), "reference": reference, "compute_dtype": "float32",
                  "param_dtype": "float32", **({"reference_path": str(root / "reference")}
                                               if reference == "separate" else {})},
        "data": {"train_files": str(root / "pairs.jsonl"), "test_files": str(root / "pairs.jsonl"), "tokenizer": str(root / "policy"),
                 "format": "standard", "batch_size": BATCH, "max_length": 128, "max_prompt_length": 64},
        "mesh": {"data": 8},
        "loss": loss,
        "train": {"output_dir": str(root / "ours")},
    }
    path = root / f"ours_{abs(hash(json.dumps(loss, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert cli.main(["eval", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    return {k.removeprefix("eval/"): v for k, v in out.items() if k.startswith("eval/")}


@pytest.mark.slow
@pytest.mark.parametrize("label,ours,kind,theirs", CASES, ids=[c[0] for c in CASES])
def test_eval_metrics_equal_trl(label, ours, kind, theirs, setup, trl_results, capsys):
    mine = _our_metrics(ours, setup, capsys)
    trl = trl_results[label]
    keys = COMPARED + EXTRA.get(kind, ())
    for key in keys:
        assert key in mine and key in trl, (key, sorted(mine), sorted(trl))
        np.testing.assert_allclose(mine[key], trl[key], rtol=RTOL, atol=1e-6, err_msg=f"{label} {key}")
    assert abs(trl["loss"]) > 1e-3  # not a degenerate case where everything is 0


def test_the_weighted_and_length_desensitised_cases_are_not_the_plain_one(trl_results):
    """WPO's weights and LD-DPO's tail weight change TRL's loss here by far more than the
    tolerance, so their agreement above checks them (not a case where they do nothing)."""
    plain = trl_results["dpo:sigmoid"]["loss"]
    for label in ("dpo:sigmoid,wpo", "dpo:sigmoid,ld"):
        assert abs(trl_results[label]["loss"] - plain) > 100 * (RTOL * plain + 1e-6), label
