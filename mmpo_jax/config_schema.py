"""The run config's sections: typed, frozen dataclasses, one per YAML section (`model`,
`data`, `loss`, `optim`, `mesh`, `train`), with their defaults, choices and range
checks (`validate`, raising a `ConfigError` that names the key). `mmpo_jax.config`
loads them from YAML and overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from mmpo_jax.errors import UserError
from mmpo_jax.models.families import SUPPORTED_MODEL_TYPES
from mmpo_jax.train.trackers import TRACKERS
from mmpo_jax.losses.registry import (
    CPO_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LOSS_NAMES,
    LOSSES,
    PER_TOKEN_LOSS_TYPES,
    dpo_type_problem,
    loss_name_hint,
    mixture,
)


class ConfigError(UserError, ValueError):
    """A config problem the user can fix; the message says which key and how."""


@dataclass(frozen=True)
class ModelInit:
    """The architecture of a randomly initialised model (`model.path: ""`).

    Names follow transformers' configs; the defaults are a tiny Llama for demos and
    tests. `model_type` picks the family (`mmpo_jax.models.families`); the family's
    own defaults fill what this section does not name (Gemma's soft-caps, layer
    pattern, query scale). Ignored when `model.path` names a checkpoint.
    """

    model_type: str = "llama"

    # SmolLM2's tokenizer size, so the ids of the tokenizer shipped with the
    # embedded SmolLM2 model all fit.
    vocab_size: int = 49152
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # None: hidden_size // num_attention_heads.
    head_dim: int | None = None
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    # q/k/v biases (and o_proj's in the families that have one); Qwen2 always has them
    attention_bias: bool = False
    # None: the family's default (Gemma: 4096 on its sliding layers; others: no window)
    sliding_window: int | None = None
    # Standard deviation of the normal init of every matrix (transformers'
    # `initializer_range`); norms start at 1, biases at 0.
    init_scale: float = 0.02

    def validate(self, prefix: str) -> None:
        _check(self.model_type in SUPPORTED_MODEL_TYPES, prefix, "model_type", self.model_type,
               f"choose one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        _check(self.sliding_window is None or self.sliding_window >= 1, prefix, "sliding_window",
               self.sliding_window, "must be >= 1 or null")
        # The rules a checkpoint's config.json is held to as well (one copy of them).
        problem = model_dims_problem(dataclasses.asdict(self))
        if problem is not None:
            key, rule = problem
            _check(False, prefix, key, getattr(self, key), rule)
        _check(self.init_scale > 0, prefix, "init_scale", self.init_scale, "must be > 0")


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

    rank: int = 0
    alpha: float = 16.0
    # Dropout on the adapters' input in training (PEFT's lora_dropout).
    dropout: float = 0.0
    # Any of q, k, v, o (attention) and gate, up, down (MLP).
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])

    def validate(self, prefix: str) -> None:
        _check(self.rank >= 0, prefix, "rank", self.rank, "must be >= 0 (0 = full fine-tuning)")
        _check(self.alpha > 0, prefix, "alpha", self.alpha, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, prefix, "dropout", self.dropout, "must be in [0, 1)")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        _check(not bad, prefix, "targets", self.targets,
               f"unknown target(s) {bad}; choose from {', '.join(LORA_TARGETS)}")
        if self.rank > 0:
            _check(len(self.targets) > 0, prefix, "targets", self.targets,
                   "must name at least one projection when rank > 0")
            _check(len(set(self.targets)) == len(self.targets), prefix, "targets", self.targets,
                   "names a projection twice")


@dataclass(frozen=True)
class ModelConfig:
    """The model: a checkpoint (or a random init) and how it runs.

    See `mmpo_jax.models.options.ModelOptions` for what each run option does.
    """

    # A local HF directory, a hub id or a `.gguf` file; "" = random init from `init`.
    path: str = ""
    init: ModelInit = field(default_factory=ModelInit)
    # dtype of the stored parameters (and of the optimizer's view of them).
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # dtype of matmuls and activations; auto = bfloat16 on GPU/TPU, float32 on CPU.
    # Log-softmax, RMSNorm statistics and the losses are float32 whatever this says.
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # auto = splash on TPU; cudnn on GPU with a bfloat16 compute dtype (and a head_dim it
    # takes), xla there for packed rows; else xla. pallas_gpu: the Pallas GPU kernel (segments).
    attention: Literal["auto", "xla", "cudnn", "splash", "pallas_gpu"] = "auto"
    # Scan the layers (nnx.scan): compile time independent of depth.
    scan_layers: bool = True
    # Per-layer rematerialisation: none (keep all activations), full (keep only each
    # layer's input, recompute the rest), dots (keep the outputs of the weight
    # matmuls, recompute attention and the elementwise ops).
    remat: Literal["none", "full", "dots"] = "dots"
    # Dropout on the attention and MLP outputs (residual branches) in training; 0 = off.
    dropout: float = 0.0
    # Sequence positions per chunk of the LM head + log-softmax (mmpo_jax.logprobs).
    logprob_chunk: int = 256
    lora: LoraConfig = field(default_factory=LoraConfig)
    # The reference model: auto = none for simpo and sft, lora_base with LoRA, else separate.
    # separate: a frozen copy of the initial weights (or of `reference_path`);
    # lora_base: the policy's base weights without adapters (LoRA only, no copy);
    # precomputed: reference log-probs computed in one pass before training and
    # cached on disk (keyed by data, model and config); none: no reference (simpo, sft;
    # sft with a reference only reports the rewards/* metrics against it).
    reference: Literal["auto", "separate", "lora_base", "precomputed", "none"] = "auto"
    # Another checkpoint as the reference (HF dir, hub id, .gguf); "" = the initial policy.
    reference_path: str = ""
    # TR-DPO (TRL's sync_ref_model): every reference_sync_steps optimizer steps the
    # reference becomes (1 - reference_mixup_alpha) x itself + reference_mixup_alpha x
    # the policy. `separate` references of full fine-tuning only; part of the checkpoint.
    sync_reference: bool = False
    reference_mixup_alpha: float = 0.6
    reference_sync_steps: int = 512

    def validate(self, prefix: str) -> None:
        self.init.validate(f"{prefix}.init")
        self.lora.validate(f"{prefix}.lora")
        if self.reference == "lora_base":
            _check(self.lora.rank > 0, prefix, "reference", self.reference,
                   "needs LoRA: set model.lora.rank > 0, or use separate / precomputed")
        if self.reference_path:
            _check(self.reference in ("auto", "separate", "precomputed"), prefix, "reference_path",
                   self.reference_path,
                   f"is only used by model.reference=separate or precomputed (not {self.reference})")
        _check(0.0 <= self.dropout < 1.0, prefix, "dropout", self.dropout, "must be in [0, 1)")
        _check(self.logprob_chunk >= 1, prefix, "logprob_chunk", self.logprob_chunk, "must be >= 1")
        _check(0.0 <= self.reference_mixup_alpha <= 1.0, prefix, "reference_mixup_alpha",
               self.reference_mixup_alpha, "must be in [0, 1]")
        _check(self.reference_sync_steps >= 1, prefix, "reference_sync_steps", self.reference_sync_steps,
               "must be >= 1")
        if self.sync_reference:
            _check(self.lora.rank == 0, prefix, "sync_reference", self.sync_reference,
                   "mixes the policy's weights into the reference: full fine-tuning only "
                   "(model.lora.rank=0), as TRL refuses sync_ref_model with PEFT")


@dataclass(frozen=True)
class DataConfig:
    """The preference data; `mmpo_jax/data/pipeline.py` says how each key is used.

    Sources: a `.jsonl`/`.json`/`.parquet` path, a list of them, a hub id, or
    `builtin:demo` / `builtin:demo-standard` (the shipped demo data).
    """

    train_files: str | list[str] | None = None
    test_files: str | list[str] | None = None
    # hub split (and demo split) for train_files / mixture, and for test_files
    split: str = "train"
    test_split: str = "test"
    # {source: fraction of its rows to keep}, instead of train_files
    mixture: dict[str, float] | None = None
    format: Literal["auto", "standard", "conversational"] = "auto"
    # an HF tokenizer dir or hub id, a .gguf file, or builtin:tiny; "" = the model's own: the
    # tokenizer of model.path (its directory's tokenizer files, a GGUF file's embedded one), or
    # builtin:tiny for a random init (settled by `mmpo_jax.config`, which reads no file for it)
    tokenizer: str = ""
    # A Jinja chat template (the text, or the path of a file holding it) used instead of the
    # tokenizer's own, as TRL recipes' `chat_template`; None = the tokenizer's
    chat_template: str | None = None
    max_length: int = 1024
    # None: the prompt is only limited by max_length
    max_prompt_length: int | None = 512
    max_invalid_fraction: float = 0.01
    # global preference pairs per optimizer step
    batch_size: int = 8
    seed: int = 0
    # None: datasets' cache (HF_DATASETS_CACHE); tokenized data goes to mmpo_jax_tokenized/ in it
    cache_dir: str | None = None
    # none: each sequence in its own row, padded to the batch's bucket; packed: the
    # sequences of several pairs share rows of pack_length tokens; shared_prompt: as packed,
    # each pair one sequence prompt | chosen | rejected (mmpo_jax/data/packing.py)
    packing: Literal["none", "packed", "shared_prompt"] = "none"
    # tokens per packed row; None: 2 x max_length when packed or shared_prompt (the longest
    # pair the truncation allows), and unused by packing none
    pack_length: int | None = None

    def settled(self) -> DataConfig:
        """This config with `pack_length` at its default when packing and unset (it stays
        None under packing none, so a run saved before packing existed reads the same)."""
        if self.packing == "none" or self.pack_length is not None:
            return self
        return dataclasses.replace(self, pack_length=2 * self.max_length)

    def validate(self, prefix: str) -> None:
        _check(self.max_length >= 2, prefix, "max_length", self.max_length, "must be >= 2")
        assert self.packing == "none" or self.pack_length is not None, "validate a settled() DataConfig"
        _check(self.pack_length is None or self.pack_length >= 2 * self.max_length, prefix, "pack_length",
               self.pack_length,
               f"must hold the longest pair data.max_length={self.max_length} allows ({2 * self.max_length} "
               f"tokens: prompt + chosen and prompt + rejected, each up to max_length); set "
               f"data.pack_length >= {2 * self.max_length} or lower data.max_length")
        # a row holds at most all of a batch's pairs: any more is padding, allocated for nothing
        # (data.pack_length=1e9 allocated rows of 4 GB each)
        fill = 2 * self.max_length * self.batch_size
        _check(self.pack_length is None or self.pack_length <= fill, prefix, "pack_length", self.pack_length,
               f"is longer than a whole batch fills (data.batch_size={self.batch_size} pairs x 2 x "
               f"data.max_length={self.max_length} = {fill} tokens): the rest of every row would be padding; "
               f"set data.pack_length <= {fill}")
        if self.max_prompt_length is not None:
            _check(
                1 <= self.max_prompt_length < self.max_length,
                prefix,
                "max_prompt_length",
                self.max_prompt_length,
                f"must be >= 1 and < max_length={self.max_length} (or null)",
            )
        _check(
            0.0 <= self.max_invalid_fraction <= 1.0,
            prefix,
            "max_invalid_fraction",
            self.max_invalid_fraction,
            "must be in [0, 1]",
        )
        _check(self.batch_size >= 1, prefix, "batch_size", self.batch_size, "must be >= 1")
        _check(0 <= self.seed < 2**32, prefix, "seed", self.seed, "must be in [0, 2**32)")
        for name in ("train_files", "test_files"):
            value = getattr(self, name)
            _check(
                value is None or (len(value) > 0 and all(v for v in ([value] if isinstance(value, str) else value))),
                prefix,
                name,
                value,
                "must name a file, a list of files or a hub id (or be null)",
            )
        if self.mixture is not None:
            _check(len(self.mixture) > 0, prefix, "mixture", self.mixture, "must name at least one source")
            for source, fraction in self.mixture.items():
                _check(
                    0.0 < fraction <= 1.0,
                    prefix,
                    f"mixture.{source}",
                    fraction,
                    "is the fraction of the source to keep: in (0, 1]",
                )
            if self.train_files is not None:
                raise ConfigError(
                    f"{prefix}: set either train_files or mixture, not both "
                    f"(train_files={self.train_files!r}, mixture={self.mixture!r})"
                )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warmup-then-decay schedule and global-norm clipping."""

    learning_rate: float = 5e-7
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0 turns clipping off
    # micro-batches per optimizer step; data.batch_size pairs are split evenly
    grad_accum: int = 1
    mu_dtype: Literal["float32", "bfloat16"] = "float32"  # AdamW first-moment dtype
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def validate(self, prefix: str) -> None:
        _check(self.learning_rate > 0, prefix, "learning_rate", self.learning_rate, "must be > 0")
        _check(self.warmup_steps >= 0, prefix, "warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.weight_decay >= 0, prefix, "weight_decay", self.weight_decay, "must be >= 0")
        _check(self.grad_accum >= 1, prefix, "grad_accum", self.grad_accum, "must be >= 1")
        _check(0 <= self.b1 < 1, prefix, "b1", self.b1, "must be in [0, 1)")
        _check(0 <= self.b2 < 1, prefix, "b2", self.b2, "must be in [0, 1)")
        _check(self.eps > 0, prefix, "eps", self.eps, "must be > 0")


@dataclass(frozen=True)
class LossConfig:
    """The preference loss; `docs/losses.md` defines each, `mmpo_jax.losses.registry`
    declares which keys each reads and its defaults.

    `sft` is supervised fine-tuning on the chosen answers (the rejected are ignored):
    the token-mean NLL of the batch's chosen tokens (TRL SFTTrainer's), or with
    `average_logps: true` the mean over pairs of each answer's per-token NLL.
    """

    name: str = field(default="mmpo", metadata={"choices": LOSS_NAMES, "hint": loss_name_hint})
    # None: the loss's own default (0.1 for mmpo, dpo and sft, 2.0 for simpo); sft
    # uses it only for the rewards/* metrics when it has a reference.
    beta: float | None = None
    reward_epsilon: float = 1.0
    rejected_epsilon: float = 0.1
    norm_eps: float = 1e-6
    aux_weight: float = 1.0
    normalize: Literal["minmax", "none"] = "minmax"
    entropy_weight: float = 0.0
    entropy_estimator: Literal["token", "score_function"] = "token"
    # dpo: one of TRL's DPO loss types or a list of them (their weighted sum, by
    # loss_weights, default 1 each); cpo: one of CPO's.
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    # dpo's sigmoid (conservative DPO), robust, exo_pair (> 0 there), aot; cpo's sigmoid, simpo
    label_smoothing: float = 0.0
    f_divergence_type: str = field(default="reverse_kl", metadata={"choices": F_DIVERGENCE_TYPES})
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    # dpo: WPO's weights (TRL's use_weighting) on every component; LD-DPO's weight of
    # the longer answer's tail tokens, policy and reference alike (TRL's ld_alpha; None: off)
    use_weighting: bool = False
    ld_alpha: float | None = None
    # the target margin (simpo, cpo's simpo); None: the loss's own (1.0 simpo, 0.5 cpo)
    gamma: float | None = None
    cpo_alpha: float = 1.0  # cpo: weight of the chosen answers' NLL
    alphapo_alpha: float = 0.0  # cpo: AlphaPO's reward shape (0 = log-probs)
    # None: the loss's own (false for mmpo, dpo, sft; true for simpo, orpo and cpo's ipo, simpo).
    average_logps: bool | None = None

    def settled(self) -> LossConfig:
        """This config with the keys left unset (None) at the loss's own defaults."""
        spec = LOSSES[self.name]
        kinds = mixture(self)
        average = spec.average_logps or any(kind in spec.averaged_types for kind in kinds)
        return dataclasses.replace(
            self,
            beta=spec.beta if self.beta is None else self.beta,
            average_logps=average if self.average_logps is None else self.average_logps,
            gamma=spec.option_default("gamma", 1.0) if self.gamma is None else self.gamma,
        )

    def validate(self, prefix: str) -> None:
        spec = LOSSES[self.name]
        assert self.beta is not None and self.average_logps is not None, "validate a settled() LossConfig"
        _check(self.beta > 0, prefix, "beta", self.beta, "must be > 0")
        _check(self.norm_eps > 0, prefix, "norm_eps", self.norm_eps, "must be > 0")
        _check(self.aux_weight >= 0, prefix, "aux_weight", self.aux_weight, "must be >= 0")
        _check(
            self.entropy_weight >= 0, prefix, "entropy_weight", self.entropy_weight, "must be >= 0"
        )
        _check(
            0.0 <= self.label_smoothing < 0.5,
            prefix,
            "label_smoothing",
            self.label_smoothing,
            "must be in [0, 0.5)",
        )
        _check(
            not (spec.averaged_only and self.average_logps is False),
            prefix,
            "average_logps",
            self.average_logps,
            f"{spec.title} always uses length-averaged log-probs; leave it unset or true",
        )
        _check(self.discopop_tau > 0, prefix, "discopop_tau", self.discopop_tau, "must be > 0")
        _check(self.cpo_alpha >= 0, prefix, "cpo_alpha", self.cpo_alpha, "must be >= 0")
        self._validate_loss_types(prefix)

    def _validate_loss_types(self, prefix: str) -> None:
        kinds = mixture(self)
        if self.name != "dpo":
            _check(not self.use_weighting, prefix, "use_weighting", self.use_weighting,
                   "is WPO's weighting of DPO's loss types: loss.name=dpo only")
            _check(self.ld_alpha is None, prefix, "ld_alpha", self.ld_alpha, "is LD-DPO's: loss.name=dpo only")
        if not kinds:
            _check(self.loss_type == "sigmoid" and self.loss_weights is None, prefix, "loss_type",
                   self.loss_type, f"loss.name={self.name} has no loss types (dpo and cpo have); "
                   "remove loss.loss_type and loss.loss_weights")
            _check(self.f_divergence_type == "reverse_kl", prefix, "f_divergence_type", self.f_divergence_type,
                   "applies to loss.name=dpo only")
            return
        if self.name == "cpo":
            _check(isinstance(self.loss_type, str) and self.loss_type in CPO_LOSS_TYPES, prefix, "loss_type",
                   self.loss_type, f"CPO takes one of {', '.join(CPO_LOSS_TYPES)} (no mixtures)")
            _check(self.loss_weights is None, prefix, "loss_weights", self.loss_weights,
                   "CPO has no mixtures; remove it")
            _check(self.f_divergence_type == "reverse_kl", prefix, "f_divergence_type", self.f_divergence_type,
                   "applies to loss.name=dpo only")
            return
        problem = dpo_type_problem(kinds, self.loss_weights, f_divergence_type=self.f_divergence_type,
                                   label_smoothing=self.label_smoothing, weighted=self.use_weighting)
        if problem is not None:
            key, rule = problem
            _check(False, prefix, key, getattr(self, key), rule)
        per_token = [k for k in kinds if k in PER_TOKEN_LOSS_TYPES]
        _check(not (per_token and self.average_logps), prefix, "average_logps", self.average_logps,
               f"loss_type {', '.join(per_token)} divides sequence sums by token counts itself; "
               "set loss.average_logps=false")
        if self.ld_alpha is not None:
            _check(0.0 <= self.ld_alpha <= 1.0, prefix, "ld_alpha", self.ld_alpha, "must be in [0, 1] (or null)")
            _check(not self.average_logps, prefix, "average_logps", self.average_logps,
                   "LD-DPO (loss.ld_alpha) weighs sequence sums; set loss.average_logps=false")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 means "all the devices the others leave"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self, prefix: str) -> None:
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            _check(value == -1 or value >= 1, prefix, name, value, "must be >= 1, or -1 for the rest")
        n_rest = [v for v in (self.data, self.fsdp, self.tensor) if v == -1]
        if len(n_rest) > 1:
            raise ConfigError(
                f"{prefix}: at most one of data, fsdp, tensor may be -1 "
                f"(got data={self.data}, fsdp={self.fsdp}, tensor={self.tensor})"
            )


DEFAULT_MAX_STEPS = 1000


@dataclass(frozen=True)
class TrainConfig:
    """The run: where it writes, how long it runs, its seed."""

    output_dir: str = "runs/default"
    # Optimizer steps; None: 1000, or as many as train.num_epochs make (give one of the two).
    max_steps: int | None = None
    # Passes over the kept training pairs (TRL's num_train_epochs, fractions too): the run
    # resolves it to train.max_steps once the data is loaded (`mmpo_jax.train.run_config`)
    num_epochs: float | None = None
    seed: int = 0
    # Metrics to metrics.jsonl / TensorBoard every this many steps.
    log_every: int = 1
    # Eval on the test data every this many steps (0 = only before and after training).
    eval_every: int = 0
    # At most this many test batches per eval (0 = the whole test split).
    eval_batches: int = 0
    # Checkpoint every this many steps (0 = only at the end), keeping the last few.
    save_every: int = 0
    keep_checkpoints: int = 2
    # Where metrics go besides metrics.jsonl (always written): tensorboard, mlflow, wandb
    # (TRL's report_to), or none (not even TensorBoard).
    report_to: str | list[str] = field(default_factory=lambda: ["tensorboard"])
    # The trackers' run name ("" = the output directory's name).
    run_name: str = ""
    # MLflow's tracking URI ("" = MLFLOW_TRACKING_URI, else MLflow's default ./mlruns).
    mlflow_tracking_uri: str = ""
    # Seconds a request to a gs:// bucket, or the wait for a checkpoint save there, keeps
    # retrying a bucket that stopped answering before the run stops naming what was not saved.
    storage_timeout_s: float = 300.0

    @property
    def steps(self) -> int:
        """The run's length: `max_steps`, which a run resolves from `num_epochs` first."""
        assert self.max_steps is not None, "resolve train.num_epochs first (run_config.with_run_length)"
        return self.max_steps

    def settled(self) -> TrainConfig:
        """`max_steps` at its default when neither it nor `num_epochs` is given."""
        if self.max_steps is None and self.num_epochs is None:
            return dataclasses.replace(self, max_steps=DEFAULT_MAX_STEPS)
        return self

    def validate(self, prefix: str) -> None:
        if self.max_steps is not None and self.num_epochs is not None:
            raise ConfigError(f"{prefix}: give train.max_steps={self.max_steps} or train.num_epochs="
                              f"{self.num_epochs:g}, not both (set the other to null)")
        _check(self.max_steps is None or self.max_steps >= 1, prefix, "max_steps", self.max_steps,
               "must be >= 1")
        _check(self.num_epochs is None or self.num_epochs > 0, prefix, "num_epochs", self.num_epochs,
               "must be > 0")
        _check(self.log_every >= 1, prefix, "log_every", self.log_every, "must be >= 1")
        for key in ("eval_every", "eval_batches", "save_every"):
            _check(getattr(self, key) >= 0, prefix, key, getattr(self, key), "must be >= 0")
        _check(self.keep_checkpoints >= 1, prefix, "keep_checkpoints", self.keep_checkpoints,
               "must be >= 1")
        _check(self.storage_timeout_s > 0, prefix, "storage_timeout_s", self.storage_timeout_s, "must be > 0")
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        unknown = [n for n in names if n not in (*TRACKERS, "none")]
        _check(not unknown, prefix, "report_to", self.report_to,
               f"unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)}, or none")
        _check("none" not in names or names == ["none"], prefix, "report_to", self.report_to,
               "none turns every tracker off: give it alone")
        _check(len(set(names)) == len(names), prefix, "report_to", self.report_to, "names a tracker twice")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check(ok: bool, prefix: str, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{prefix}.{key}={value!r}: {rule}")
