"""`mmpo-jax compare --config CONFIG --step [key=value ...]`: one train step, ours against PyTorch.

Builds the config's trainer (model, reference, LoRA) and the first batch of its
training data, then computes one step's loss, metrics and gradients (no update)
twice: with our jitted step code (`mmpo_jax.train.step.loss_and_grads`, on the
config's mesh) and with transformers' `LlamaForCausalLM` holding the same weights
plus `mmpo_jax.torch_ref` (LoRA layers, losses, micro-batches). Both sides run in
float32 with dropout off (random masks cannot match across frameworks). The
result: `loss_abs_diff`, the largest difference of each metric, and
`max_rel_grad_diff`, the largest over trainable tensors of
`max|g_ours - g_torch| / max|g_torch|`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax.config import load_config
from mmpo_jax.data.batches import train_batches
from mmpo_jax.data.layout import device_batch
from mmpo_jax.errors import UserError
from mmpo_jax.models.hf_export import export_hf
from mmpo_jax.models.hf_weights import iter_hf_weights
from mmpo_jax.models.lora_export import iter_peft_weights
from mmpo_jax.train.run_config import with_run_length
from mmpo_jax.train.run_data import attach_reference_tables, load_data
from mmpo_jax.train.setup import build_trainer, check_vocab, run_reference
from mmpo_jax.train.step import loss_and_grads

if TYPE_CHECKING:
    from mmpo_jax.models.decoder import Decoder
    from mmpo_jax.models.decoder_config import DecoderConfig
    from mmpo_jax.config_schema import RunConfig
    from mmpo_jax.train.setup import Trainer

# compare runs both sides in float32 without dropout: applied as overrides, so the
# config is validated with them once and never changed after
FLOAT32_NO_DROPOUT = ("model.param_dtype=float32", "model.compute_dtype=float32", "model.dropout=0",
                      "model.lora.dropout=0")


def _float32_no_dropout_note(cfg: RunConfig) -> str | None:
    """What `FLOAT32_NO_DROPOUT` changes in the user's `cfg`, for the notes (None: nothing)."""
    m = cfg.model
    changed = []
    if m.param_dtype != "float32" or m.compute_dtype not in ("auto", "float32"):
        changed.append(f"param_dtype={m.param_dtype}, compute_dtype={m.compute_dtype} -> float32")
    if m.dropout or m.lora.dropout:
        changed.append(f"dropout={m.dropout}, lora.dropout={m.lora.dropout} -> 0")
    return "compare runs both sides in float32 without dropout: " + "; ".join(changed) if changed else None


def _perturb_lora_b(trainer: Trainer, std: float, seed: int) -> None:
    """B = 0 at init hides A's gradient; a random B makes every adapter gradient non-zero."""
    flat = nnx.to_flat_state(trainer.state.trainable)
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(flat):
        if str(path[-1]).endswith("_lora_b"):
            value = var.get_value()
            noise = std * jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype)
            var.set_value(jax.device_put(noise, value.sharding))


def _torch_model(module: Decoder, arch: DecoderConfig) -> Any:
    """transformers' model holding `module`'s weights (LoRA merged), float32, eager attention."""
    # lazy: torch and transformers are optional (the `torch` extra); `compare_step` checked them
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="mmpo-compare-") as tmp:
        export_hf(module, arch, None, tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
    return model.train(False)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.abs(b).max())
    diff = float(np.abs(a - b).max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def compare_step(config: str | None, overrides: list[str], lora_b_std: float, seed: int) -> dict[str, Any]:
    try:
        # lazy: torch and transformers are optional (the `torch` extra); torch_ref.step imports both
        import torch

        from mmpo_jax.torch_ref import step as torch_step
    except ImportError as err:
        raise UserError(f"compare needs torch and transformers ({err}); pip install 'mmpo-jax[torch]'") from None

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mmpo-compare-run-") as run_dir:
        asked = list(overrides) + [f"train.output_dir={run_dir}"]
        note = _float32_no_dropout_note(load_config(config, asked))
        notes.extend([note] if note else [])
        cfg = load_config(config, asked + list(FLOAT32_NO_DROPOUT))
        data = load_data(cfg)
        cfg, _ = with_run_length(cfg, len(data.train))  # the schedule of train.num_epochs' length
        trainer = build_trainer(cfg)
        check_vocab(data.tokenizer, trainer.arch, cfg)
        lora = trainer.options.lora is not None
        # the reference's weights, before anything changes the policy
        ref_module = run_reference(trainer)
        torch_reference = _torch_model(ref_module, trainer.arch) if ref_module is not None else None
        attach_reference_tables(cfg, trainer, data, lambda text: None)
        if lora and lora_b_std > 0:
            _perturb_lora_b(trainer, lora_b_std, seed)
            notes.append(f"LoRA B matrices set to normal(0, {lora_b_std}) (B = 0 hides A's gradient)")
        # the peer reads padded rows; ours the configured layout of the same pairs (packed
        # or shared-prompt rows go through the segment masks and the explicit sources)
        host = train_batches(data.train, cfg.data.batch_size, cfg.data.seed)[0]
        ours = host if trainer.packing is None else train_batches(
            data.train, cfg.data.batch_size, cfg.data.seed, packing=trainer.packing)[0]
        batch = device_batch(ours, trainer.mesh, data.train_ref)

        with jax.default_matmul_precision("highest"):
            grads, metrics = jax.jit(
                lambda st, b: loss_and_grads(trainer.sdef, trainer.scfg, trainer.mesh, st, b)
            )(trainer.state, batch)
        ours_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        grad_module = trainer.sdef.policy(trainer.state, grads)

        state = trainer.state
        if trainer.options.lora is not None:
            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            base = trainer.sdef.policy(state, zeros)
            policy = _torch_model(base, trainer.arch)
            adapters = dict(iter_peft_weights(trainer.sdef.policy(state)))
            torch_step.add_lora(policy, adapters, trainer.options.lora.scale)
            ours_grads = {n.removeprefix("base_model.model.").removesuffix(".weight"): g
                          for n, g in iter_peft_weights(grad_module)}
        else:
            policy = _torch_model(trainer.sdef.policy(state), trainer.arch)
            ours_grads = dict(iter_hf_weights(grad_module))
        host_batch = {k: np.asarray(getattr(host, k)) for k in ("input_ids", "loss_mask", "pair_mask")}
        if data.train_ref is not None:
            index = np.asarray(host.example_index)
            host_batch["ref_logps"] = np.where((index >= 0)[:, None], data.train_ref[np.maximum(index, 0)], 0.0)
        torch.manual_seed(seed)
        torch_metrics, torch_grads = torch_step.step_loss_and_grads(
            policy, torch_reference, host_batch, cfg.loss, cfg.optim.grad_accum
        )
        pad_row = getattr(policy.get_input_embeddings(), "padding_idx", None)

    rel: dict[str, float] = {}
    for name in sorted(set(ours_grads) & set(torch_grads)):
        a, b = np.asarray(ours_grads[name], np.float64), torch_grads[name]
        if name == "model.embed_tokens.weight" and pad_row is not None:
            # nn.Embedding(padding_idx=...) gives that row no gradient in transformers
            a, b = np.delete(a, pad_row, axis=0), np.delete(b, pad_row, axis=0)
        if a.shape != b.shape:
            raise UserError(f"gradient of '{name}': shape {a.shape} (ours) vs {b.shape} (torch)")
        rel[name] = _relative(a, b)
    one_sided = sorted(set(ours_grads) ^ set(torch_grads))
    if one_sided:
        notes.append(f"tensors with a gradient on one side only: {', '.join(one_sided[:6])}")
    worst = max(rel, key=lambda name: rel[name]) if rel else None
    metric_diffs = {k: abs(ours_metrics[k] - torch_metrics[k]) for k in sorted(set(ours_metrics) & set(torch_metrics))}
    result: dict[str, Any] = {
        "loss_abs_diff": abs(ours_metrics["loss"] - torch_metrics["loss"]),
        "max_rel_grad_diff": float(rel[worst]) if worst else 0.0,
        "worst_grad_tensor": worst,
        "grad_tensors_compared": len(rel),
        "loss_ours": ours_metrics["loss"],
        "loss_torch": torch_metrics["loss"],
        "metric_abs_diffs": metric_diffs,
        "loss": dataclasses.asdict(cfg.loss),
        "lora": dataclasses.asdict(cfg.model.lora) if lora else None,
        "reference": cfg.model.reference,
        "grad_accum": cfg.optim.grad_accum,
        "pairs": int(host.input_ids.shape[0]),
        "seq": int(host.input_ids.shape[2]),
        "mesh": dict(trainer.mesh.shape),
    }
    if notes:
        result["notes"] = notes
    return result
