"""The `model` section of the run config: the checkpoint or random init (`ModelInit`),
its LoRA adapters (`LoraConfig`) and how it runs (`ModelConfig`), with the model
dimension rules a checkpoint's config.json is held to as well (`model_dims_problem`).
`mmpo_jax.config_schema` holds the other sections and re-exports these."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from mmpo_jax.choices import MODEL_TYPES
from mmpo_jax.config_fields import check, option

# The rule `train.reference.ReferenceMode.check` applies to a library caller too (one copy).
LORA_BASE_NEEDS_LORA = "needs LoRA: set model.lora.rank > 0, or use separate / precomputed"


@dataclass(frozen=True)
class ModelInit:
    """The architecture of a randomly initialised model (`model.path: ""`).

    Names follow transformers' configs; the defaults are a tiny Llama for demos and
    tests. `model_type` picks the family (`mmpo_jax.models.families`); the family's
    own defaults fill what this section does not name (Gemma's soft-caps, layer
    pattern, query scale). Ignored when `model.path` names a checkpoint.
    """

    model_type: str = option("llama", "the family of a random init: " + ", ".join(MODEL_TYPES) + " (its own "
                             "defaults fill the rest: Gemma's soft-caps, layer pattern, query scale)")
    vocab_size: int = option(49152, "vocabulary size: SmolLM2's, so the ids of the tokenizer shipped with the "
                             "embedded SmolLM2 model all fit")
    hidden_size: int = option(64, "width of the residual stream")
    intermediate_size: int = option(256, "width of the MLP")
    num_hidden_layers: int = option(2, "decoder layers")
    num_attention_heads: int = option(4, "query heads")
    num_key_value_heads: int = option(2, "key/value heads (grouped-query attention: divides the query heads)")
    head_dim: int | None = option(None, "size of each head; null: hidden_size / num_attention_heads")
    tie_word_embeddings: bool = option(True, "the LM head is the embedding matrix")
    rope_theta: float = option(10000.0, "RoPE base")
    rms_norm_eps: float = option(1e-5, "RMSNorm epsilon")
    max_position_embeddings: int = option(2048, "the context length")
    attention_bias: bool = option(False, "q/k/v biases (and o_proj's in the families that have one); Qwen2 "
                                  "always has them")
    sliding_window: int | None = option(None, "null: the family's default (Gemma: 4096 on its sliding layers; "
                                        "others: no window)")
    init_scale: float = option(0.02, "standard deviation of the normal init of every matrix (transformers' "
                               "`initializer_range`); norms start at 1, biases at 0")

    def validate(self, prefix: str) -> None:
        check(self.model_type in MODEL_TYPES, prefix, "model_type", self.model_type,
              f"choose one of {', '.join(MODEL_TYPES)}")
        check(self.sliding_window is None or self.sliding_window >= 1, prefix, "sliding_window",
              self.sliding_window, "must be >= 1 or null")
        # The rules a checkpoint's config.json is held to as well (one copy of them).
        problem = model_dims_problem(dataclasses.asdict(self))
        if problem is not None:
            key, rule = problem
            check(False, prefix, key, getattr(self, key), rule)
        check(self.init_scale > 0, prefix, "init_scale", self.init_scale, "must be > 0")


# The largest model dimensions accepted, from `model.init` or a checkpoint's config.json.
# Far above any released model (Llama 3.1 405B: 126 layers, hidden 16384, MLP 53248,
# 128 heads; vocabularies reach ~262k, contexts ~10M), so no real model is refused, while a
# typo or a broken file (num_hidden_layers=1e9) stops at load instead of hanging in model
# building (one loop turn per layer) or exhausting memory.
MODEL_DIM_LIMITS: dict[str, int] = {
    "vocab_size": 2**24,
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 2**14,
    "num_key_value_heads": 2**14,
    "head_dim": 2**14,
    "max_position_embeddings": 2**24,
}


# The smallest value that makes sense where it is not 1. One position holds no pair: a
# prompt and its answer need two at the least (and `data.max_length` must fit the
# context, `train.setup.check_context`). A model of 1 position is a broken file.
MODEL_DIM_MINIMUMS: dict[str, tuple[int, str]] = {
    "max_position_embeddings": (2, "a sequence of a prompt token and an answer token needs 2 positions"),
}


def model_dims_problem(dims: dict[str, Any]) -> tuple[str, str] | None:
    """The first rule the model dimensions `dims` break, as `(key, rule)`; None if none.

    `dims` has transformers' names (a `model.init` section, a checkpoint's config.json);
    a key absent or None is not checked (the reader's default applies), except that
    `head_dim` None stands for hidden_size // num_attention_heads. `ModelInit.validate`
    and the checkpoint readers (`mmpo_jax.models.pretrained`) both use it, so a config
    and a checkpoint are refused for the same values.
    """
    for key, limit in MODEL_DIM_LIMITS.items():
        value = dims.get(key)
        if value is None:
            continue
        # bool is an int subclass, and JSON's 1e9 is a float: neither is a size
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return key, "must be a positive integer"
        if value > limit:
            return key, f"must be <= {limit} (far above any real model: a typo?)"
        least, why = MODEL_DIM_MINIMUMS.get(key, (1, ""))
        if value < least:
            return key, f"must be >= {least} ({why})"
    window = dims.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        # every family is held to it, those that ignore the key too: 0 or -1 means the
        # file was not written by transformers (null is "no window")
        return "sliding_window", "must be a positive integer (the positions a layer sees) or null"
    for key in ("rope_theta", "rms_norm_eps"):
        value = dims.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0:
            return key, "must be a positive number"
    heads, kv = dims.get("num_attention_heads"), dims.get("num_key_value_heads")
    if heads is not None and kv is not None and heads % kv:
        return "num_key_value_heads", f"must divide num_attention_heads={heads}"
    head_dim, hidden = dims.get("head_dim"), dims.get("hidden_size")
    if head_dim is not None:
        if head_dim % 2:
            return "head_dim", "must be even (RoPE rotates pairs)"
    elif hidden is not None and heads is not None and hidden % (2 * heads):
        return "hidden_size", (f"must be a multiple of 2 x num_attention_heads={heads} (an even head size: "
                               "RoPE rotates pairs), or set head_dim")
    return None


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (`rank` 0 = full fine-tuning).

    Each targeted projection `W` becomes `W + (alpha / rank) * A @ B` with `A`
    `[in, rank]` (PEFT's init: uniform in +-1/sqrt(in)) and `B` `[rank, out]` = 0, so
    training starts from the base model; only `A` and `B` are trained and get
    optimizer state.
    """

    rank: int = option(0, "LoRA adapters' rank (0 = full fine-tuning); only the adapters get optimizer state")
    alpha: float = option(16.0, "LoRA scale numerator (the adapters are scaled by alpha / rank)")
    dropout: float = option(0.0, "dropout on the adapters' input in training (PEFT's lora_dropout)")
    targets: list[str] = option(help="the projections adapted: any of q, k, v, o (attention) and gate, up, "
                                "down (MLP)", factory=lambda: ["q", "k", "v", "o"])

    def validate(self, prefix: str) -> None:
        check(self.rank >= 0, prefix, "rank", self.rank, "must be >= 0 (0 = full fine-tuning)")
        check(self.alpha > 0, prefix, "alpha", self.alpha, "must be > 0")
        check(0.0 <= self.dropout < 1.0, prefix, "dropout", self.dropout, "must be in [0, 1)")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        check(not bad, prefix, "targets", self.targets,
              f"unknown target(s) {bad}; choose from {', '.join(LORA_TARGETS)}")
        if self.rank > 0:
            check(len(self.targets) > 0, prefix, "targets", self.targets,
                  "must name at least one projection when rank > 0")
            check(len(set(self.targets)) == len(self.targets), prefix, "targets", self.targets,
                  "names a projection twice")


@dataclass(frozen=True)
class ModelConfig:
    """The model: a checkpoint (or a random init) and how it runs.

    See `mmpo_jax.models.options.ModelOptions` for what each run option does.
    """

    path: str = option("", "HF directory, hub id or `.gguf` file; empty: random init from `model.init.*` "
                       "(transformers' config names)", shown='`""`')
    init: ModelInit = option(help="the architecture of a random init", factory=ModelInit)
    param_dtype: Literal["float32", "bfloat16"] = option(
        "float32", "dtype of the stored parameters (and of the optimizer's view of them)")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "dtype of matmuls and activations (auto: bfloat16 on GPU/TPU, float32 on CPU); log-softmax, "
        "RMSNorm statistics and the losses are float32 whatever this says")
    attention: Literal["auto", "xla", "cudnn", "splash", "pallas_gpu"] = option(
        "auto", "`xla`, `cudnn`, `splash` (the Pallas TPU kernel: segment ids, windows, soft-cap; rows padded to "
        "its 128-token block; interpreted, slowly, off TPU), `pallas_gpu` (JAX's Pallas GPU flash kernel: "
        "causal, segment ids, no window or soft-cap; rows padded to its 128-token block; interpreted, slowly, "
        "off GPU; not yet measured on a GPU), or auto (splash on TPU; cuDNN on GPU with bfloat16, xla for "
        "packed rows there; xla for Gemma 2 off TPU, whose attention soft-cap cuDNN does not take), printed at "
        "start with its reason. A kernel that cannot run the model, backend or data.packing stops the run at "
        "start, naming the fix")
    scan_layers: bool = option(True, "scan the layers (nnx.scan): compile time independent of depth")
    remat: Literal["none", "full", "dots"] = option(
        "dots", "per-layer rematerialisation: `none` (keep all activations), `full` (keep only each layer's "
        "input, recompute the rest), `dots` (keep the outputs of the weight matmuls, recompute attention and "
        "the elementwise ops: measured fastest and ~half the memory of none on an H200, benchmarks/NOTES.md)")
    dropout: float = option(0.0, "dropout on the attention and MLP outputs (residual branches) in training; "
                            "0 = off")
    logprob_chunk: int = option(256, "LM-head chunk length: sequence positions per chunk of the LM head + "
                                "log-softmax (mmpo_jax.logprobs)")
    lora: LoraConfig = option(help="LoRA adapters", factory=LoraConfig)
    reference: Literal["auto", "separate", "lora_base", "precomputed", "none"] = option(
        "auto", "`separate` (a frozen copy of the initial weights, or of `reference_path`), `lora_base` (LoRA: "
        "the policy's base weights without adapters, no copy), `precomputed` (reference log-probs computed in "
        "one pass before training, cached in `<output_dir>/reference_logps/` with its SHA-256, keyed by data, "
        "model and config; a table that does not verify, or is not finite float32 of the data's rows, is said, "
        "moved aside and recomputed), `none` (no reference: SimPO, SFT; sft with a reference only reports the "
        "rewards/* metrics against it); auto = none for simpo and sft, lora_base with LoRA, else separate")
    reference_path: str = option("", "another checkpoint as the reference (HF dir, hub id, .gguf; modes separate, "
                                 "precomputed); empty: the initial policy", shown='`""`')
    sync_reference: bool = option(
        False, "TR-DPO (TRL's `sync_ref_model`): every `reference_sync_steps` optimizer steps the `separate` "
        "reference becomes `(1 - alpha) ref + alpha policy`; full fine-tuning only; checkpointed, so a resume "
        "is exact")
    reference_mixup_alpha: float = option(0.6, "TR-DPO's alpha: the policy's share of the synced reference")
    reference_sync_steps: int = option(512, "TR-DPO: optimizer steps between reference syncs")

    def validate(self, prefix: str) -> None:
        self.init.validate(f"{prefix}.init")
        self.lora.validate(f"{prefix}.lora")
        if self.reference == "lora_base":
            check(self.lora.rank > 0, prefix, "reference", self.reference, LORA_BASE_NEEDS_LORA)
        if self.reference_path:
            check(self.reference in ("auto", "separate", "precomputed"), prefix, "reference_path",
                  self.reference_path,
                  f"is only used by model.reference=separate or precomputed (not {self.reference})")
        check(0.0 <= self.dropout < 1.0, prefix, "dropout", self.dropout, "must be in [0, 1)")
        check(self.logprob_chunk >= 1, prefix, "logprob_chunk", self.logprob_chunk, "must be >= 1")
        check(0.0 <= self.reference_mixup_alpha <= 1.0, prefix, "reference_mixup_alpha",
              self.reference_mixup_alpha, "must be in [0, 1]")
        check(self.reference_sync_steps >= 1, prefix, "reference_sync_steps", self.reference_sync_steps,
              "must be >= 1")
        if self.sync_reference:
            check(self.lora.rank == 0, prefix, "sync_reference", self.sync_reference,
                  "mixes the policy's weights into the reference: full fine-tuning only "
                  "(model.lora.rank=0), as TRL refuses sync_ref_model with PEFT")
