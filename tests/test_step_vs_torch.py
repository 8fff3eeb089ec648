"""One train step on configs/tiny.yaml against PyTorch (`mmpo-jax compare --config --step`).

Targets: the loss within 1e-5 and every gradient tensor within 1e-4 of
`max|g_ours - g_torch| / max|g_torch|`, float32, for MMPO (default, aux_weight=0,
normalize=none), DPO, SimPO and SFT (token mean), with full fine-tuning and with LoRA (B set
non-zero, since B = 0 hides A's gradient). The PyTorch side is transformers'
LlamaForCausalLM with hand-written LoRA layers and `mmpo_jax.torch_ref` losses.
"""

import json

import pytest

from mmpo_jax.cli import main
from mmpo_jax.torch_ref.compare_step import compare_step

LOSSES = {
    "mmpo": [],
    "mmpo-aux0": ["loss.aux_weight=0"],
    "mmpo-no-norm": ["loss.normalize=none"],
    "dpo": ["loss.name=dpo"],
    "simpo": ["loss.name=simpo"],
    "sft": ["loss.name=sft"],
    # ORPO's NLL over the chosen rows with the prompt; CPO's over the completions; a mixture
    "orpo": ["loss.name=orpo", "loss.beta=0.5"],
    "cpo-simpo": ["loss.name=cpo", "loss.loss_type=simpo", "loss.beta=2.0"],
    "dpo-ipo+sft": ["loss.name=dpo", "loss.loss_type=[ipo,sft]", "loss.loss_weights=[1.0,0.5]"],
}
LORA_LOSSES = ["mmpo", "mmpo-aux0", "mmpo-no-norm", "dpo", "simpo"]
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[q,k,v,o,gate,up,down]"]


def _check(result, lora):
    assert result["loss_abs_diff"] < 1e-5 * max(1.0, abs(result["loss_torch"])), result
    assert result["max_rel_grad_diff"] < 1e-4, result
    # every trainable tensor was compared (20 full tensors of the 2-layer tiny model, or 2 per adapter)
    assert result["grad_tensors_compared"] == (2 * 7 * 2 if lora else 20), result


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSSES))
def test_full_finetuning_step_matches_torch(name):
    _check(compare_step("configs/tiny.yaml", LOSSES[name], 0.02, 0), lora=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", LORA_LOSSES)  # the losses of the other cases are covered above
def test_lora_step_matches_torch(name):
    result = compare_step("configs/tiny.yaml", LOSSES[name] + LORA, 0.02, 0)
    _check(result, lora=True)
    assert any("LoRA B" in n for n in result["notes"])


def test_lora_b_zero_hides_a_gradient():
    """With B = 0 (the init) A's gradient is exactly 0 on both sides; B's is not."""
    result = compare_step("configs/tiny.yaml", ["model.lora.rank=2", "model.lora.targets=[q]"], 0.0, 0)
    assert result["max_rel_grad_diff"] < 1e-4 and result["grad_tensors_compared"] == 4


# each family's random init at the tiny config's size, windows shorter than its sequences;
# Gemma 3 over 6 layers so its 5:1 pattern has a full layer
FAMILY_INITS = {
    "qwen3": ["model.init.model_type=qwen3", "model.init.head_dim=24"],
    "gemma2": ["model.init.model_type=gemma2", "model.init.sliding_window=8"],
    "gemma3": ["model.init.model_type=gemma3", "model.init.sliding_window=8", "model.init.num_hidden_layers=6"],
}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("family", list(FAMILY_INITS))
def test_each_family_step_matches_torch(family, lora):
    """DPO's step on each family's tiny random model, full fine-tuning and LoRA on every projection."""
    from mmpo_jax.config import load_config
    from mmpo_jax.models.hf_weights import hf_weight_names
    from mmpo_jax.models.decoder_config import model_config_from_init

    overrides = FAMILY_INITS[family] + ["loss.name=dpo"] + (LORA if lora else [])
    arch = model_config_from_init(load_config("configs/tiny.yaml", overrides).model.init)
    assert arch.model_type == family
    result = compare_step("configs/tiny.yaml", overrides, 0.02 if lora else 0.0, 0)
    assert result["loss_abs_diff"] < 1e-5 * max(1.0, abs(result["loss_torch"])), result
    assert result["max_rel_grad_diff"] < 1e-4, result
    full = len(hf_weight_names(arch))
    assert result["grad_tensors_compared"] == (2 * 7 * arch.num_hidden_layers if lora else full), result


@pytest.mark.slow
def test_accumulation_and_precomputed_reference_match_torch():
    result = compare_step("configs/tiny.yaml", ["optim.grad_accum=2", "data.batch_size=16", "model.reference=precomputed",
                                                "loss.entropy_weight=0.1"], 0.0, 0)
    _check(result, lora=False)


def test_dropout_and_bfloat16_are_overridden_and_said():
    """compare forces float32 and no dropout through overrides of the config it loads (a
    validated config is never edited); the torch match shows both really are off."""
    result = compare_step("configs/tiny.yaml", ["model.dropout=0.1", "model.compute_dtype=bfloat16"], 0.0, 0)
    _check(result, lora=False)
    assert result["notes"] == ["compare runs both sides in float32 without dropout: param_dtype=float32, "
                               "compute_dtype=bfloat16 -> float32; dropout=0.1, lora.dropout=0.0 -> 0"]


@pytest.mark.slow
def test_cli_json_keys(capsys):
    assert main(["compare", "--config", "configs/tiny.yaml", "--step", "--json", "loss.name=dpo",
                 "data.batch_size=16", "mesh.fsdp=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["loss_abs_diff"] < 1e-5 and out["max_rel_grad_diff"] < 1e-4
    assert out["pairs"] == 16 and out["loss"]["name"] == "dpo" and out["mesh"]["fsdp"] == 2


def test_cli_rejects_half_a_step_comparison(capsys):
    assert main(["compare", "--step"]) == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["data.packing=shared_prompt", "loss.name=orpo", "loss.beta=0.5"],  # ORPO's NLL reads the prompt too
    ["data.packing=shared_prompt", "optim.grad_accum=2", "data.batch_size=16", "model.reference=precomputed",
     "loss.entropy_weight=0.1"],
    ["data.packing=packed", "loss.name=dpo"],
], ids=["shared-orpo", "shared-accum2-precomputed-entropy", "packed-dpo"])
def test_packed_layouts_step_matches_torch_on_padded_rows(overrides):
    """Our step on packed or shared-prompt rows against the PyTorch step on the same pairs
    padded (compare's peer reads the padded layout)."""
    _check(compare_step("configs/tiny.yaml", overrides, 0.0, 0), lora=False)
