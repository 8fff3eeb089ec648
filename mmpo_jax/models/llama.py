"""A decoder-only transformer for the Llama family in Flax NNX (Llama 2/3, SmolLM2, Mistral, Qwen2).

Public interface (checkpoint import/export, `compare` and the train step use these):

- `LlamaConfig`: the architecture, with transformers' names; `from_hf_dict` reads a
  transformers `config.json` (transformers 4's `rope_theta`/`rope_scaling` and
  transformers 5's `rope_parameters`), `to_hf_dict` writes one transformers loads.
- `ModelOptions`: how the model runs (dtypes, attention kernel, scan, remat, dropout,
  LoRA adapters); `ModelOptions.from_config(model_cfg)` from the `model` config section.
- `Llama(cfg, options, rngs=...)`: `model(input_ids [B, T] int32) -> hidden [B, T, D]`
  after the final RMSNorm; `model.lm_head_kernel() -> [D, V]`. Log-probs are computed
  from these two by `mmpo_jax.logprobs` (chunked, no [B, T, V] logits).
  `model.decode(input_ids, positions, cache, slot, mask)`: the same layers with a KV
  cache, for generation (`mmpo_jax.generate`, which owns the cache layout and masks).
- `hf_weight_names(cfg)`: transformers' tensor names of the model.
- `build_model(cfg, options, mesh=, get_tensor=, seed=, init_scale=)`: random init, or
  every parameter filled from `get_tensor(hf_name) -> np.ndarray` (transformers layout),
  each placed straight onto its sharding.
- `iter_hf_weights(model)`: the inverse, `(hf_name, float32 numpy)` one tensor at a time.

Layout. Our kernels are `[in, out]` (torch Linear weights are `[out, in]`), with the
heads split out: q `[embed, heads, head_dim]`, k/v `[embed, kv_heads, head_dim]`, o
`[heads, head_dim, embed]`, gate/up `[embed, mlp]`, down `[mlp, embed]`, the embedding
`[vocab, embed]`, the untied LM head `[embed, vocab]`. With `scan_layers` every layer
parameter has a leading `layers` axis (all layers stacked). Each parameter carries its
logical axis names in the `out_sharding` metadata (`nnx.get_partition_spec` under
`flax.core.spmd` rules, or `mmpo_jax.sharding.model_shardings`, turns them into mesh
axes).

LoRA (`ModelOptions.lora`): a targeted projection `W` (layout above) gets `<t>_lora_a`
`[*in, rank]` and `<t>_lora_b` `[rank, *out]` (`nnx.LoRAParam`, a subclass of
`nnx.Param`), and computes `x @ W + (alpha / rank) * (dropout(x) @ A) @ B`, as PEFT does;
B starts at zero. `iter_hf_weights` merges the adapters into the exported weights.

RoPE uses transformers' rotate-half convention: HF checkpoints load without any
permutation (GGUF's llama.cpp permutation is undone by the GGUF reader).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
REMAT_CHOICES = ("none", "full", "dots")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_CHOICES = ("auto", "xla", "cudnn")


# --------------------------------------------------------------------------- #
# Architecture config
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class LlamaConfig:
    """The architecture, with transformers' field names.

    `rope_scaling` is None (plain RoPE) or a dict with `rope_type` 'linear'
    (`factor`) or 'llama3' (`factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`). `attention_bias` adds q/k/v biases
    (Qwen2; for model_type 'llama' transformers also puts one on o_proj, and so do
    we). `sliding_window` (Mistral) limits attention to the last `sliding_window`
    positions including the current one.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, tuple):
            object.__setattr__(self, "eos_token_id", list(self.eos_token_id))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model_type '{self.model_type}' is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UserError(f"sliding_window={self.sliding_window} must be >= 1 or null")
        _rope_type(self.rope_scaling)  # validates

    # Hashable although it holds a dict (rope_scaling) and maybe a list (eos ids):
    # the config is a static argument of jitted functions.
    def __hash__(self) -> int:
        return hash(repr(self))

    @property
    def rope_type(self) -> str:
        return _rope_type(self.rope_scaling)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        """Reads a transformers `config.json` dict (transformers 4 or 5 style).

        Unsupported model types, rope types, activations and options raise a
        `UserError` naming them.
        """
        d = dict(d)
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model_type '{model_type}' is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UserError(f"hidden_act '{act}' is not supported (only silu, the SwiGLU of Llama)")
        if d.get("mlp_bias"):
            raise UserError("mlp_bias=true is not supported")
        prf = (d.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
        if prf not in (None, 1, 1.0):
            raise UserError(f"partial_rotary_factor={prf} is not supported")
        if d.get("layer_types") and any(t != "full_attention" for t in d["layer_types"]) and (
            model_type == "qwen2" and d.get("use_sliding_window")
        ):
            raise UserError("qwen2 with use_sliding_window=true (per-layer windows) is not supported")

        # RoPE: transformers 5 `rope_parameters` {rope_type, rope_theta, ...}, or
        # transformers 4 `rope_theta` + `rope_scaling` {rope_type|type, ...}.
        params = d.get("rope_parameters")
        if params is not None and not isinstance(params, dict):
            raise UserError(f"rope_parameters must be a mapping, got {params!r}")
        if params and any(isinstance(v, dict) for v in params.values()):
            raise UserError("per-layer-type rope_parameters are not supported")
        theta = None
        scaling: dict | None = None
        if params:
            params = dict(params)
            theta = params.pop("rope_theta", None)
            scaling = params
        if theta is None:
            theta = d.get("rope_theta", 10000.0)
        if not scaling or _rope_type(scaling, check=False) == "default":
            legacy = d.get("rope_scaling")
            scaling = dict(legacy) if legacy else scaling
        if scaling is not None:
            scaling = dict(scaling)
            if "type" in scaling and "rope_type" not in scaling:
                scaling["rope_type"] = scaling.pop("type")
            scaling.pop("type", None)
            scaling.pop("rope_theta", None)
            scaling.pop("partial_rotary_factor", None)
            if _rope_type(scaling) == "default":
                scaling = None

        sliding = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            sliding = None
        if model_type == "llama":
            sliding = None

        hidden = d["hidden_size"]
        heads = d["num_attention_heads"]
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=hidden,
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or hidden // heads,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                sliding_window=sliding,
                model_type=model_type,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
            )
        except KeyError as err:  # pragma: no cover - the lookups above raise first
            raise UserError(f"config.json lacks '{err.args[0]}'") from None

    def to_hf_dict(self) -> dict:
        """A `config.json` dict that transformers loads as this architecture (float32).

        Writes both transformers 5's `rope_parameters` and transformers 4's
        `rope_theta`/`rope_scaling`, so older readers (and vLLM) agree.
        """
        rope_params: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_params.update({k: v for k, v in self.rope_scaling.items() if k != "rope_type"})
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling is not None else None,
            "rope_parameters": rope_params,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": "float32",
            "dtype": "float32",
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        elif self.model_type == "mistral":
            # Written even when None: MistralConfig's default is 4096.
            d["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = self.num_hidden_layers if self.sliding_window is None else 0
        return d

    @property
    def o_bias(self) -> bool:
        """transformers' Llama puts `attention_bias` on o_proj too; Qwen2 does not."""
        return self.attention_bias and self.model_type == "llama"


def _rope_type(scaling: dict | None, check: bool = True) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if check and kind not in SUPPORTED_ROPE_TYPES:
        raise UserError(
            f"rope type '{kind}' is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if check and kind == "linear" and "factor" not in scaling:
        raise UserError("rope type 'linear' needs 'factor'")
    if check and kind == "llama3":
        missing = [
            k
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if k not in scaling
        ]
        if missing:
            raise UserError(f"rope type 'llama3' needs {', '.join(missing)}")
    return kind


# --------------------------------------------------------------------------- #
# Run options
# --------------------------------------------------------------------------- #
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _as_dtype(value: Any) -> Any:
    if isinstance(value, str):
        if value not in _DTYPES:
            raise UserError(f"dtype '{value}' is not supported; choose one of {', '.join(_DTYPES)}")
        return _DTYPES[value]
    return jnp.dtype(value).type


@dataclass(frozen=True)
class LoraOptions:
    """LoRA adapters: `rank`, `alpha` (scale alpha / rank), input `dropout`, `targets`."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise UserError(f"LoRA rank={self.rank} must be >= 1")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise UserError(f"LoRA targets {list(self.targets)}: choose from {', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class ModelOptions:
    """How the model runs; none of these change the architecture or the checkpoint.

    - `param_dtype`: dtype the parameters are stored in.
    - `compute_dtype`: dtype of matmuls and activations (parameters are cast to it in
      the forward). RMSNorm statistics, RoPE angles and attention softmax are float32
      internally; the log-softmax over the vocabulary (`mmpo_jax.logprobs`) is float32.
    - `attention`: 'xla' (`jax.nn.dot_product_attention(implementation='xla')`),
      'cudnn' (cuDNN flash attention: GPU, bf16/fp16 only), 'auto' (cudnn on GPU with a
      bf16/fp16 compute dtype and a head_dim cuDNN takes, else xla).
    - `scan_layers`: the layers' weights are stacked on a leading `layers` axis and run
      with `nnx.scan`, so compile time does not grow with depth.
    - `remat`: per-layer rematerialisation in the backward pass:
      'none' keeps every activation; 'full' keeps only each layer's input and recomputes
      the layer; 'dots' keeps the outputs of the weight matmuls (no batch dims) and
      recomputes attention and the elementwise ops.
    - `dropout`: rate on the attention and MLP outputs (the residual branches); only
      applied when `Llama.__call__` gets a `dropout_key`.
    - `lora`: LoRA adapters on some projections (None = none); see the module docstring.

    Frozen: change a copy with `dataclasses.replace(options, remat="full")`.
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    scan_layers: bool = True
    remat: Literal["none", "full", "dots"] = "none"
    dropout: float = 0.0
    lora: LoraOptions | None = None
    # the backend `auto` choices are settled for ("cpu", "gpu", "tpu"); None: this process's
    backend: str | None = None

    def __post_init__(self) -> None:
        # frozen (hashable: it is static in the model's graphdef); normalise dtypes
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype))
        object.__setattr__(self, "compute_dtype", _as_dtype(self.compute_dtype))
        # a library caller's options (the run config checks its own choices first)
        if self.attention not in ATTENTION_CHOICES:
            raise UserError(
                f"attention '{self.attention}' is not supported; choose one of "
                f"{', '.join(ATTENTION_CHOICES)}"
            )
        if self.remat not in REMAT_CHOICES:
            raise UserError(
                f"remat '{self.remat}' is not supported; choose one of {', '.join(REMAT_CHOICES)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must be in [0, 1)")

    @classmethod
    def from_config(cls, model_cfg: Any, backend: str | None = None) -> "ModelOptions":
        """From the `model` config section (`mmpo_jax.config.ModelConfig`), its `auto`
        settled for `backend` ("cpu", "gpu", "tpu"; None: this process's JAX backend),
        so an ahead-of-time compile for a TPU resolves as a TPU run does."""
        backend = jax.default_backend() if backend is None else backend
        compute = model_cfg.compute_dtype
        if compute == "auto":
            compute = "float32" if backend == "cpu" else "bfloat16"
        return cls(
            param_dtype=model_cfg.param_dtype,
            compute_dtype=compute,
            attention=model_cfg.attention,
            scan_layers=model_cfg.scan_layers,
            remat=model_cfg.remat,
            dropout=model_cfg.dropout,
            lora=lora_options(model_cfg.lora),
            backend=backend,
        )

    @property
    def uses_dropout(self) -> bool:
        """Whether training draws dropout masks (residual or LoRA dropout)."""
        return self.dropout > 0 or (self.lora is not None and self.lora.dropout > 0)

    def attention_implementation(self, head_dim: int) -> str:
        """The `implementation=` passed to `jax.nn.dot_product_attention` ('xla' or 'cudnn')."""
        if self.attention != "auto":
            return self.attention
        low_precision = jnp.dtype(self.compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        on_gpu = (self.backend or jax.default_backend()) == "gpu"
        if on_gpu and low_precision and head_dim % 8 == 0 and head_dim <= 128:
            return "cudnn"
        return "xla"


def lora_options(lora_cfg: Any) -> LoraOptions | None:
    """From the `model.lora` config section; None when `rank` is 0 (full fine-tuning)."""
    if lora_cfg is None or lora_cfg.rank == 0:
        return None
    return LoraOptions(rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                       targets=tuple(lora_cfg.targets))


def model_config_from_init(init: Any) -> LlamaConfig:
    """The `LlamaConfig` of a random init from the `model.init` config section."""
    return LlamaConfig(
        vocab_size=init.vocab_size,
        hidden_size=init.hidden_size,
        intermediate_size=init.intermediate_size,
        num_hidden_layers=init.num_hidden_layers,
        num_attention_heads=init.num_attention_heads,
        num_key_value_heads=init.num_key_value_heads,
        head_dim=init.head_dim,
        rms_norm_eps=init.rms_norm_eps,
        rope_theta=init.rope_theta,
        tie_word_embeddings=init.tie_word_embeddings,
        max_position_embeddings=init.max_position_embeddings,
    )


# --------------------------------------------------------------------------- #
# Parameters with logical axes
# --------------------------------------------------------------------------- #
def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any,
           init: str, scale: float) -> nnx.Param:
    """A parameter with logical axis names (`out_sharding` metadata, no eager sharding:
    names become mesh axes only through `mmpo_jax.sharding`)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def _lora_params(module: nnx.Module, lora: LoraOptions | None, rngs: nnx.Rngs, dtype: Any,
                 shapes: dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...], tuple[str, ...]]]) -> None:
    """Sets `<t>_lora_a` `[*in, rank]` / `<t>_lora_b` `[rank, *out]` on `module` for each
    target `t` in `shapes` (`t -> (in_shape, in_axes, out_shape, out_axes)`); None where
    not targeted. A is PEFT's default init (kaiming-uniform with a=sqrt(5): uniform in
    +-1/sqrt(fan_in)), B is zero, so the adapted model starts equal to the base."""
    for t, (in_shape, in_axes, out_shape, out_axes) in shapes.items():
        a = b = None
        if lora is not None and t in lora.targets:
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            # its own stream when there is one, so adding adapters leaves the base init unchanged
            key = rngs.lora() if "lora" in rngs else rngs.params()
            value = jax.random.uniform(key, (*in_shape, lora.rank), jnp.float32, -bound, bound)
            a = nnx.LoRAParam(value.astype(dtype), out_sharding=(*in_axes, "lora_rank"), eager_sharding=False)
            b = nnx.LoRAParam(jnp.zeros((lora.rank, *out_shape), dtype),
                              out_sharding=("lora_rank", *out_axes), eager_sharding=False)
        setattr(module, f"{t}_lora_a", a)
        setattr(module, f"{t}_lora_b", b)


def _lora_delta(module: nnx.Module, t: str, x: jax.Array, lora: LoraOptions | None,
                key: jax.Array | None, compute_dtype: Any) -> jax.Array | None:
    """`scale * (dropout(x) @ A) @ B` of target `t` (None when `t` has no adapter).

    `x` `[B, T, *in]`; the result `[B, T, *out]`, added to the base projection."""
    a = getattr(module, f"{t}_lora_a")
    if a is None:
        return None
    b = getattr(module, f"{t}_lora_b")
    if key is not None and lora.dropout > 0:
        x = _dropout(x, lora.dropout, jax.random.fold_in(key, LORA_TARGETS.index(t)))
    a, b = a[...].astype(compute_dtype), b[...].astype(compute_dtype)
    n_in = a.ndim - 1
    xa = jnp.tensordot(x, a, axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))
    return (lora.scale * jnp.tensordot(xa, b, axes=((xa.ndim - 1,), (0,)))).astype(compute_dtype)


def _add(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any, *, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), ("norm",), dtype, "ones", 0.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # transformers: normalise in float32, cast back, then scale.
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * y


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """The RoPE inverse frequencies `[head_dim // 2]` (float32), as transformers computes them."""
    dim = cfg.head_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    kind = cfg.rope_type
    if kind == "linear":
        inv = inv / np.float32(cfg.rope_scaling["factor"])
    elif kind == "llama3":
        s = cfg.rope_scaling
        factor = s["factor"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        low_wavelen = old / low
        high_wavelen = old / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, inv_l)
    return inv.astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, N, H]`; cos/sin `[T, H]` in x's dtype (transformers' rotate-half form)."""
    return x * cos[None, :, None, :] + _rotate_half(x) * sin[None, :, None, :]


def apply_rope_rows(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`apply_rope` with per-row positions: x `[B, T, N, H]`; cos/sin `[B, T, H]`."""
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


# Masked attention scores: a large finite negative (as jax.nn.dot_product_attention),
# so a query that sees no key (a padding position) gets uniform weights, not NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention over a KV cache.

    q `[B, T, N, H]`; k, v `[B, K, S, H]` (K kv heads divide the N heads: query head n
    reads kv head n // (N // K), transformers' `repeat_kv`); mask `[B, T, S]` bool.
    Scores and softmax in float32 (as `jax.nn.dot_product_attention`'s xla path), the
    weights cast back to v's dtype for the second matmul. Returns `[B, T, N, H]`.
    """
    b, t, n, h = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * jnp.float32(scale)
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, options: ModelOptions, scale: float, *, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd = options.param_dtype
        self.q_kernel = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, "normal", scale)
        self.k_kernel = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd, "normal", scale)
        self.v_kernel = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd, "normal", scale)
        self.o_kernel = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, "normal", scale)
        if cfg.attention_bias:
            self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), pd, "zeros", 0.0)
            self.k_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros", 0.0)
            self.v_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros", 0.0)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.o_bias = _param(rngs, (d,), ("norm",), pd, "zeros", 0.0) if cfg.o_bias else None
        _lora_params(self, options.lora, rngs, pd, {
            "q": ((d,), ("embed",), (h, hd), ("heads", "head_dim")),
            "k": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
            "v": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
            "o": ((h, hd), ("heads", "head_dim"), (d,), ("embed",)),
        })
        self.lora = options.lora
        self.head_dim = hd
        self.sliding_window = cfg.sliding_window
        self.compute_dtype = options.compute_dtype
        self.implementation = options.attention_implementation(hd)

    def _project(self, x: jax.Array, lora_key: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q `[B, T, heads, head_dim]`, k, v `[B, T, kv_heads, head_dim]` of x `[B, T, D]`, before RoPE."""
        cd = self.compute_dtype

        def proj(t, kernel, bias):
            y = jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(cd))
            y = _add(y, _lora_delta(self, t, x, self.lora, lora_key, cd))
            return y if bias is None else y + bias[...].astype(cd)

        return (proj("q", self.q_kernel, self.q_bias), proj("k", self.k_kernel, self.k_bias),
                proj("v", self.v_kernel, self.v_bias))

    def _output(self, out: jax.Array, lora_key: jax.Array | None) -> jax.Array:
        """The output projection of the attention `[B, T, heads, head_dim]` -> `[B, T, D]`."""
        cd = self.compute_dtype
        y = jnp.einsum("btnh,nhd->btd", out, self.o_kernel[...].astype(cd))
        y = _add(y, _lora_delta(self, "o", out, self.lora, lora_key, cd))
        return y if self.o_bias is None else y + self.o_bias[...].astype(cd)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 lora_key: jax.Array | None = None) -> jax.Array:
        q, k, v = self._project(x, lora_key)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=self.head_dim**-0.5,
            is_causal=True,
            local_window_size=window,
            implementation=self.implementation,
        )
        return self._output(out, lora_key)

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache_k: jax.Array,
               cache_v: jax.Array, slot: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention with a KV cache (generation; no dropout).

        x `[B, T, D]` are the tokens of cache slots `slot .. slot+T-1` (`slot` an int32
        scalar, the same for every row: rows are left-padded); cos/sin `[B, T, head_dim]`
        at each row's own positions; cache_k/cache_v `[B, kv_heads, S, head_dim]`;
        mask `[B, T, S]` bool, True where a query may see a key slot (the caller
        handles causality, the padding and the sliding window). Returns
        `(y [B, T, D], cache_k, cache_v)` with this chunk's keys and values written.
        """
        q, k, v = self._project(x, None)
        q = apply_rope_rows(q, cos, sin)
        k = apply_rope_rows(k, cos, sin)
        start = (0, 0, slot, 0)
        # [B, T, K, H] -> the cache's [B, K, T, H]: the slot axis next to head_dim, so
        # each head's keys are one contiguous [S, H] matrix for the score matmul
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), start)
        out = cached_attention(q, cache_k, cache_v, mask, self.head_dim**-0.5)
        return self._output(out, None), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, options: ModelOptions, scale: float, *, rngs: nnx.Rngs):
        d, m, pd = cfg.hidden_size, cfg.intermediate_size, options.param_dtype
        self.gate_kernel = _param(rngs, (d, m), ("embed", "mlp"), pd, "normal", scale)
        self.up_kernel = _param(rngs, (d, m), ("embed", "mlp"), pd, "normal", scale)
        self.down_kernel = _param(rngs, (m, d), ("mlp", "embed"), pd, "normal", scale)
        _lora_params(self, options.lora, rngs, pd, {
            "gate": ((d,), ("embed",), (m,), ("mlp",)),
            "up": ((d,), ("embed",), (m,), ("mlp",)),
            "down": ((m,), ("mlp",), (d,), ("embed",)),
        })
        self.lora = options.lora
        self.compute_dtype = options.compute_dtype

    def __call__(self, x: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        cd = self.compute_dtype

        def proj(t, h):
            y = h @ getattr(self, f"{t}_kernel")[...].astype(cd)
            return _add(y, _lora_delta(self, t, h, self.lora, lora_key, cd))

        return proj("down", jax.nn.silu(proj("gate", x)) * proj("up", x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, options: ModelOptions, scale: float, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, options.param_dtype, rngs=rngs)
        self.self_attn = Attention(cfg, options, scale, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, options.param_dtype, rngs=rngs
        )
        self.mlp = MLP(cfg, options, scale, rngs=rngs)
        self.dropout = options.dropout

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        k1 = k2 = k3 = k4 = None
        if dropout_key is not None:
            k1, k2, k3, k4 = jax.random.split(dropout_key, 4)
        a = self.self_attn(self.input_layernorm(x), cos, sin, k3)
        if k1 is not None and self.dropout > 0:
            a = _dropout(a, self.dropout, k1)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x), k4)
        if k2 is not None and self.dropout > 0:
            m = _dropout(m, self.dropout, k2)
        return x + m

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
               slot: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The layer on cache slots `slot..slot+T-1` (see `Attention.decode`); no dropout."""
        a, cache_k, cache_v = self.self_attn.decode(
            self.input_layernorm(x), cos, sin, cache_k, cache_v, slot, mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache_k, cache_v


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _remat_policy(name: str) -> Callable | None:
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


def _layer_fn(remat: str) -> Callable:
    """`(layer, x, cos, sin, key) -> x`, rematerialised per `remat`."""

    def run(layer: DecoderLayer, x, cos, sin, key):
        return layer(x, cos, sin, key)

    if remat == "none":
        return run
    return nnx.remat(run, policy=_remat_policy(remat), prevent_cse=False)


class Llama(nnx.Module):
    """The decoder: token embedding, `num_hidden_layers` layers, final RMSNorm.

    `__call__(input_ids [B, T] int32) -> hidden [B, T, D]` (after the final norm, in
    the compute dtype). Sequences are right-padded: causal attention alone keeps real
    tokens from seeing the padding, and positions are 0..T-1 for every row.
    `lm_head_kernel() -> [D, V]` (the embedding transposed when tied).
    """

    def __init__(self, cfg: LlamaConfig, options: ModelOptions, *, rngs: nnx.Rngs,
                 init_scale: float = 0.02, mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        self.options = options
        # With a mesh, activations between layers are constrained to the batch axes
        # (`batch` rule of mmpo_jax.sharding): FSDP gathers weights, not activations.
        self.mesh = mesh
        pd = options.param_dtype
        s = init_scale
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, "normal", s)
        if options.scan_layers:
            n = cfg.num_hidden_layers

            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(cfg, options, s, rngs=r)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List(
                [DecoderLayer(cfg, options, s, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
            )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, "normal", s)

    def lm_head_kernel(self) -> jax.Array:
        """The LM head `[hidden, vocab]` in the compute dtype (the embedding transposed when tied)."""
        cd = self.options.compute_dtype
        if self.lm_head is None:
            return self.embed_tokens[...].astype(cd).T
        return self.lm_head[...].astype(cd)

    def rope(self, seq_len: int) -> tuple[jax.Array, jax.Array]:
        """cos, sin `[T, head_dim]` for positions 0..T-1, computed in float32."""
        pos = jnp.arange(seq_len, dtype=jnp.float32)
        # a constant of the architecture, not state: nothing to train, save or shard
        inv_freq = jnp.asarray(rope_inv_freq(self.cfg), jnp.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cd = self.options.compute_dtype
        return jnp.cos(emb).astype(cd), jnp.sin(emb).astype(cd)

    def _constrain(self, x: jax.Array) -> jax.Array:
        if self.mesh is None:
            return x
        from mmpo_jax.sharding import logical_to_spec

        spec = logical_to_spec(("batch", "seq", "act_embed"), x.shape, self.mesh)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """The token embeddings `[B, T, D]` of input_ids `[B, T]`, in the compute dtype."""
        table = self.embed_tokens[...]
        if self.mesh is not None:
            # FSDP: gather the table over `fsdp` first (as XLA does for matmul weights);
            # the lookup then splits over the vocab shards without resharding activations.
            from mmpo_jax.sharding import logical_to_spec

            spec = logical_to_spec(("vocab", None), table.shape, self.mesh)
            table = jax.lax.with_sharding_constraint(table, jax.sharding.NamedSharding(self.mesh, spec))
        return self._constrain(jnp.take(table, input_ids, axis=0).astype(self.options.compute_dtype))

    def __call__(self, input_ids: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final hidden states `[B, T, D]`; `dropout_key` turns dropout on (training)."""
        cfg, options = self.cfg, self.options
        x = self._embed(input_ids)
        cos, sin = self.rope(input_ids.shape[1])
        n = cfg.num_hidden_layers
        use_dropout = dropout_key is not None and options.uses_dropout
        keys = jax.random.split(dropout_key, n) if use_dropout else None
        layer_fn = _layer_fn(options.remat)
        if options.scan_layers:

            @nnx.scan(in_axes=(nnx.Carry, 0, None, None, 0 if use_dropout else None),
                      out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(h, layer, cos, sin, key):
                return self._constrain(layer_fn(layer, h, cos, sin, key))

            x = body(x, self.layers, cos, sin, keys)
        else:
            for i, layer in enumerate(self.layers):
                x = self._constrain(layer_fn(layer, x, cos, sin, keys[i] if use_dropout else None))
        return self._constrain(self.norm(x))

    def rope_at(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin `[B, T, head_dim]` at positions `[B, T]` (int), as `rope` computes them."""
        inv_freq = jnp.asarray(rope_inv_freq(self.cfg), jnp.float32)
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cd = self.options.compute_dtype
        return jnp.cos(emb).astype(cd), jnp.sin(emb).astype(cd)

    def decode(self, input_ids: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array],
               slot: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The forward with a KV cache, for generation (no dropout).

        input_ids `[B, T]` int32 go to cache slots `slot..slot+T-1` (`slot` an int32
        scalar shared by all rows); positions `[B, T]` their RoPE positions (each row's
        own: a left-padded row starts at position 0 after its padding); cache `(k, v)`,
        each `[layers, B, kv_heads, S, head_dim]`; mask `[B, T, S]` bool, True where a
        query may see a key slot. Returns `(hidden [B, T, D] after the final norm, cache)`
        with this chunk's keys and values written into the cache.
        """
        x = self._embed(input_ids)
        cos, sin = self.rope_at(positions)
        cache_k, cache_v = cache
        if self.options.scan_layers:

            @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(h, layer, ck, cv):
                h, ck, cv = layer.decode(h, cos, sin, ck, cv, slot, mask)
                return self._constrain(h), (ck, cv)

            x, (cache_k, cache_v) = body(x, self.layers, cache_k, cache_v)
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                x, ck, cv = layer.decode(x, cos, sin, cache_k[i], cache_v[i], slot, mask)
                x = self._constrain(x)
                ks.append(ck)
                vs.append(cv)
            cache_k, cache_v = jnp.stack(ks), jnp.stack(vs)
        return self._constrain(self.norm(x)), (cache_k, cache_v)


# --------------------------------------------------------------------------- #
# transformers names <-> our parameters
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class _Tensor:
    """One HF tensor: where it lives in our state and how the layouts map."""

    hf_name: str
    path: tuple[str, ...]  # our state path (without the layer index)
    layer: int | None  # the layer (None for embeddings, final norm, lm head)
    # our per-layer shape (without the `layers` axis)
    shape: tuple[int, ...]
    # transformers' shape
    hf_shape: tuple[int, ...]
    # to_ours(np hf array) -> our layout; to_hf(np ours) -> hf layout
    to_ours: Callable[[np.ndarray], np.ndarray] = field(compare=False, default=lambda a: a)
    to_hf: Callable[[np.ndarray], np.ndarray] = field(compare=False, default=lambda a: a)


def _linear_in_out(out_shape: tuple[int, ...], in_dim: int):
    """torch [out, in] <-> ours [in, *out_shape]."""
    def to_ours(a):
        return np.ascontiguousarray(a.T).reshape((in_dim, *out_shape))

    def to_hf(a):
        return np.ascontiguousarray(a.reshape(in_dim, -1).T)

    return to_ours, to_hf


def _o_proj(h: int, hd: int, d: int):
    """torch o_proj [d, h*hd] <-> ours [h, hd, d]."""
    def to_ours(a):
        return np.ascontiguousarray(a.T).reshape(h, hd, d)

    def to_hf(a):
        return np.ascontiguousarray(a.reshape(h * hd, d).T)

    return to_ours, to_hf


def _reshape(shape: tuple[int, ...], hf_shape: tuple[int, ...]):
    return (lambda a: a.reshape(shape)), (lambda a: a.reshape(hf_shape))


def _tensor_table(cfg: LlamaConfig) -> list[_Tensor]:
    d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    m, v = cfg.intermediate_size, cfg.vocab_size
    out: list[_Tensor] = [_Tensor("model.embed_tokens.weight", ("embed_tokens",), None, (v, d), (v, d))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.append(_Tensor(p + "input_layernorm.weight", ("input_layernorm", "weight"), i, (d,), (d,)))
        out.append(_Tensor(p + "self_attn.q_proj.weight", ("self_attn", "q_kernel"), i, (d, h, hd), (h * hd, d),
                           *_linear_in_out((h, hd), d)))
        if cfg.attention_bias:
            out.append(_Tensor(p + "self_attn.q_proj.bias", ("self_attn", "q_bias"), i, (h, hd), (h * hd,),
                               *_reshape((h, hd), (h * hd,))))
        out.append(_Tensor(p + "self_attn.k_proj.weight", ("self_attn", "k_kernel"), i, (d, k, hd), (k * hd, d),
                           *_linear_in_out((k, hd), d)))
        if cfg.attention_bias:
            out.append(_Tensor(p + "self_attn.k_proj.bias", ("self_attn", "k_bias"), i, (k, hd), (k * hd,),
                               *_reshape((k, hd), (k * hd,))))
        out.append(_Tensor(p + "self_attn.v_proj.weight", ("self_attn", "v_kernel"), i, (d, k, hd), (k * hd, d),
                           *_linear_in_out((k, hd), d)))
        if cfg.attention_bias:
            out.append(_Tensor(p + "self_attn.v_proj.bias", ("self_attn", "v_bias"), i, (k, hd), (k * hd,),
                               *_reshape((k, hd), (k * hd,))))
        out.append(_Tensor(p + "self_attn.o_proj.weight", ("self_attn", "o_kernel"), i, (h, hd, d), (d, h * hd),
                           *_o_proj(h, hd, d)))
        if cfg.o_bias:
            out.append(_Tensor(p + "self_attn.o_proj.bias", ("self_attn", "o_bias"), i, (d,), (d,)))
        out.append(_Tensor(p + "post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), i,
                           (d,), (d,)))
        out.append(_Tensor(p + "mlp.gate_proj.weight", ("mlp", "gate_kernel"), i, (d, m), (m, d),
                           *_linear_in_out((m,), d)))
        out.append(_Tensor(p + "mlp.up_proj.weight", ("mlp", "up_kernel"), i, (d, m), (m, d),
                           *_linear_in_out((m,), d)))
        out.append(_Tensor(p + "mlp.down_proj.weight", ("mlp", "down_kernel"), i, (m, d), (d, m),
                           *_linear_in_out((d,), m)))
    out.append(_Tensor("model.norm.weight", ("norm", "weight"), None, (d,), (d,)))
    if not cfg.tie_word_embeddings:
        out.append(_Tensor("lm_head.weight", ("lm_head",), None, (d, v), (v, d),
                           *_linear_in_out((v,), d)))
    return out


def hf_weight_names(cfg: LlamaConfig) -> list[str]:
    """transformers' tensor names of this architecture, in module order.

    `model.embed_tokens.weight`, `model.layers.{i}.input_layernorm.weight`,
    `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` (+ q/k/v `.bias` with
    `attention_bias`), `model.layers.{i}.post_attention_layernorm.weight`,
    `model.layers.{i}.mlp.{gate,up,down}_proj.weight`, `model.norm.weight`, and
    `lm_head.weight` when the embeddings are untied.
    """
    return [t.hf_name for t in _tensor_table(cfg)]


def hf_weight_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """transformers' shape of each tensor of `hf_weight_names(cfg)`."""
    return {t.hf_name: t.hf_shape for t in _tensor_table(cfg)}


def _group_by_param(cfg: LlamaConfig, scan: bool) -> dict[tuple, list[_Tensor]]:
    """Our state path (as a tuple of str/int keys) -> the HF tensors that fill it
    (several, one per layer, when the layers are stacked)."""
    groups: dict[tuple, list[_Tensor]] = {}
    for t in _tensor_table(cfg):
        if t.layer is None:
            key = t.path
        elif scan:
            key = ("layers", *t.path)
        else:
            key = ("layers", t.layer, *t.path)
        groups.setdefault(key, []).append(t)
    return groups


def _state_key(path: tuple) -> tuple:
    return tuple(int(p) if isinstance(p, int) else str(p) for p in path)


# --------------------------------------------------------------------------- #
# Building
# --------------------------------------------------------------------------- #
def build_model(
    cfg: LlamaConfig,
    options: ModelOptions,
    *,
    mesh: jax.sharding.Mesh | None = None,
    get_tensor: Callable[[str], np.ndarray] | None = None,
    seed: int = 0,
    init_scale: float | None = None,
) -> Llama:
    """The model, its parameters on `mesh` (sharded by `mmpo_jax.sharding` rules) or on
    the default device when `mesh` is None.

    `get_tensor` None: random init (normal with std `init_scale`, default 0.02; norms 1,
    biases 0) from `seed`, computed under jit straight into the shardings.

    Otherwise every parameter is read with `get_tensor(hf_name) -> np.ndarray` in
    transformers' layout (torch Linear weights `[out, in]`; any float dtype),
    converted to ours and placed straight onto its sharding: the model is built
    abstractly (`nnx.eval_shape`, nothing allocated), then one parameter at a time
    is converted into a single host array (a stacked layer parameter filled layer by
    layer) whose per-device shards, views of it, `jax.make_array_from_callback`
    places on this process's devices. `get_tensor` is called once per name (in
    our parameters' order, not the file's); a memory-mapped safetensors tensor or a
    dequantised GGUF tensor both do. A missing tensor (`get_tensor`
    raising KeyError) or a wrongly shaped one raises a `UserError` naming it and the
    expected shape.
    """
    from mmpo_jax import sharding as shd

    scale = 0.02 if init_scale is None else float(init_scale)

    def make() -> Llama:
        lora_key = jax.random.fold_in(jax.random.key(seed), 1)
        rngs = nnx.Rngs(params=seed, lora=lora_key)
        return Llama(cfg, options, rngs=rngs, init_scale=scale, mesh=mesh)

    abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract)
    target = shd.model_shardings(abs_state, mesh) if mesh is not None else None

    if get_tensor is None:
        if target is None:
            return make()
        out_shardings = target

        @partial(jax.jit, out_shardings=out_shardings)
        def init_state():
            return nnx.split(make())[1]

        return nnx.merge(graphdef, init_state())

    groups = _group_by_param(cfg, options.scan_layers)
    flat = nnx.to_flat_state(abs_state)
    # LoRA adapters are not in the checkpoint: they start from their init (B = 0).
    lora_init = (
        dict(nnx.to_flat_state(jax.jit(lambda: nnx.state(make(), nnx.LoRAParam))()))
        if options.lora is not None else {}
    )
    seen = set()
    leaves = []
    for path, var in flat:
        key = _state_key(path)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if path in lora_init:
            init = lora_init[path]
            init = init.get_value() if hasattr(init, "get_value") else init.value
            leaves.append((path, var.replace(jax.device_put(init, _sharding_for(target, path, mesh)))))
            continue
        if key not in groups:
            raise AssertionError(f"no HF tensor maps to parameter {key}")  # a bug in this file
        seen.add(key)
        tensors = groups[key]
        sharding = _sharding_for(target, path, mesh)
        arr = _load_param(tensors, value.shape, value.dtype, sharding, get_tensor, stacked=len(tensors) > 1
                          or (options.scan_layers and tensors[0].layer is not None))
        leaves.append((path, var.replace(arr)))
    missing = set(groups) - seen
    assert not missing, missing  # a bug in this file
    state = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, state)


def _sharding_for(target, path, mesh):
    if target is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    node = target
    for p in path:
        node = node[p]
    return node.get_value() if hasattr(node, "get_value") else node


def _load_param(tensors: list[_Tensor], shape: tuple[int, ...], dtype: Any, sharding,
                get_tensor: Callable[[str], np.ndarray], stacked: bool) -> jax.Array:
    """One parameter, read from its HF tensor(s) (one per layer when stacked).

    Each HF tensor is read once and converted into one host array in our layout (one
    parameter at a time: the host never holds more than the largest parameter and
    one raw tensor); the devices' shards are views of it, which
    `jax.make_array_from_callback` places on its devices.
    """
    np_dtype = np.dtype(jnp.dtype(dtype))

    def read(t: _Tensor) -> np.ndarray:
        try:
            a = get_tensor(t.hf_name)
        except KeyError:
            raise UserError(
                f"checkpoint lacks tensor '{t.hf_name}' (expected shape {list(t.hf_shape)})"
            ) from None
        a = np.asarray(a)
        if tuple(a.shape) != tuple(t.hf_shape):
            raise UserError(
                f"tensor '{t.hf_name}' has shape {list(a.shape)}, expected {list(t.hf_shape)}"
            )
        return t.to_ours(a)

    if stacked:
        host = np.empty(shape, np_dtype)
        for i, t in enumerate(tensors):
            host[i] = read(t)
    else:
        host = np.ascontiguousarray(read(tensors[0]), dtype=np_dtype)
    assert host.shape == tuple(shape), (tensors[0].hf_name, host.shape, shape)
    return jax.make_array_from_callback(shape, sharding, lambda idx: host[idx])


def iter_hf_weights(model: Llama) -> Iterator[tuple[str, np.ndarray]]:
    """`(hf_name, float32 numpy in transformers' layout)`, one tensor at a time, in
    `hf_weight_names` order. Each tensor is gathered to the host on its own (a
    stacked layer parameter is read one layer slice at a time)."""
    cfg = model.cfg
    scan = model.options.scan_layers
    lora = model.options.lora
    state = nnx.state(model, nnx.Param)

    def read(path: tuple[str, ...], layer: int | None) -> np.ndarray | None:
        node: Any = state
        if layer is not None:
            node = node["layers"]
            if not scan:
                node = node[layer]
        for p in path[:-1]:
            node = node[p]
        if path[-1] not in node:
            return None
        node = node[path[-1]]
        value = node.get_value() if hasattr(node, "get_value") else node.value
        if layer is not None and scan:
            value = value[layer]
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
        return np.asarray(jax.device_get(value)).astype(np.float32)

    for t in _tensor_table(cfg):
        host = read(t.path, t.layer)
        if lora is not None and t.path[-1].endswith("_kernel"):
            target = t.path[-1].removesuffix("_kernel")
            a = read((*t.path[:-1], f"{target}_lora_a"), t.layer)
            if a is not None:
                b = read((*t.path[:-1], f"{target}_lora_b"), t.layer)
                host = merge_lora(host, a, b, lora.scale)
        yield t.hf_name, t.to_hf(host)


def merge_lora(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """`W + scale * A @ B` in our layout: `w` `[*in, *out]`, `a` `[*in, r]`, `b` `[r, *out]`
    (float64 products, so the merge adds no rounding beyond float32's last bit)."""
    n_in = a.ndim - 1
    fan_in = math.prod(a.shape[:n_in])
    delta = a.reshape(fan_in, -1).astype(np.float64) @ b.reshape(b.shape[0], -1).astype(np.float64)
    return (w.astype(np.float64) + scale * delta.reshape(w.shape)).astype(np.float32)
