"""How a model runs (`ModelOptions`: dtypes, attention kernel, scan, remat, dropout)
and its LoRA adapters (`LoraOptions`); none of these change the architecture or the
checkpoint."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp

from mmpo_jax.config_schema import LORA_TARGETS, ModelConfig
from mmpo_jax.errors import UserError

if TYPE_CHECKING:
    from mmpo_jax.config_schema import LoraConfig

# the `model` section's choices, read from its declaration
REMAT_CHOICES: tuple[str, ...] = typing.get_args(typing.get_type_hints(ModelConfig)["remat"])
ATTENTION_CHOICES: tuple[str, ...] = typing.get_args(typing.get_type_hints(ModelConfig)["attention"])


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
      bf16/fp16 compute dtype and a head_dim cuDNN takes, and no attention soft-cap;
      else xla).
    - `scan_layers`: the layers' weights are stacked on a leading `layers` axis and run
      with `nnx.scan`, so compile time does not grow with depth.
    - `remat`: per-layer rematerialisation in the backward pass:
      'none' keeps every activation; 'full' keeps only each layer's input and recomputes
      the layer; 'dots' keeps the outputs of the weight matmuls (no batch dims) and
      recomputes attention and the elementwise ops.
    - `dropout`: rate on the attention and MLP outputs (the residual branches); only
      applied when `Decoder.__call__` gets a `dropout_key`.
    - `lora`: LoRA adapters on some projections (None = none); see the module docstring.

    Frozen: change a copy with `dataclasses.replace(options, remat="full")`.
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    attention: Literal["auto", "xla", "cudnn", "splash", "pallas_gpu"] = "auto"
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
    def from_config(cls, model_cfg: ModelConfig, backend: str | None = None) -> "ModelOptions":
        """From the `model` config section (`mmpo_jax.config_schema.ModelConfig`), its `auto`
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
    def target(self) -> str:
        """The backend the model runs (or is compiled ahead of time) for: "cpu", "gpu", "tpu"."""
        return self.backend or jax.default_backend()

    def interprets(self, implementation: str) -> bool:
        """Whether a Pallas kernel runs in interpret mode: off the backend it is written
        for (splash: TPU, pallas_gpu: GPU), exact and slow, as the tests run it."""
        return {"splash": self.target != "tpu", "pallas_gpu": self.target != "gpu"}.get(implementation, False)

    @property
    def uses_dropout(self) -> bool:
        """Whether training draws dropout masks (residual or LoRA dropout)."""
        return self.dropout > 0 or (self.lora is not None and self.lora.dropout > 0)

    def attention_implementation(self, head_dim: int, soft_cap: bool = False, sliding_window: bool = False
                                 ) -> Literal["xla", "cudnn", "splash", "pallas_gpu"]:
        """The attention kernel: 'xla' or 'cudnn' (`jax.nn.dot_product_attention`'s),
        'splash' (the Pallas TPU kernel, `mmpo_jax.models.splash`; `auto` on TPU) or
        'pallas_gpu' (the Pallas GPU kernel, `mmpo_jax.models.pallas_gpu`; opt-in).

        `soft_cap`: the model caps its attention scores (Gemma 2), which
        `jax.nn.dot_product_attention` has no argument for: `auto` is then splash on TPU,
        else xla (the explicit-scores path), and `cudnn` a `UserError`. `sliding_window`:
        some layers attend within a window, which the Pallas GPU kernel does not take."""
        backend = self.target
        if soft_cap and self.attention == "cudnn":
            raise UserError("model.attention=cudnn: cuDNN attention takes no attention logit soft-cap "
                            "(Gemma 2's attn_logit_softcapping); set model.attention to auto or xla")
        if self.attention == "splash" and backend == "gpu":
            raise UserError("model.attention=splash is a TPU kernel (on a GPU it would run in Pallas "
                            "interpret mode, far too slow); set model.attention to auto, pallas_gpu, "
                            "cudnn or xla")
        if self.attention == "pallas_gpu":
            if backend == "tpu":
                raise UserError("model.attention=pallas_gpu is a GPU (Triton) kernel; on TPU set "
                                "model.attention to auto or splash")
            if soft_cap or sliding_window:
                what = "an attention logit soft-cap" if soft_cap else "a sliding window"
                raise UserError(f"model.attention=pallas_gpu: the Pallas GPU kernel takes no {what} "
                                f"(this model has one); set model.attention to auto or xla")
        if self.attention != "auto":
            return self.attention
        if backend == "tpu":
            return "splash"
        if soft_cap:
            return "xla"
        low_precision = jnp.dtype(self.compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        if backend == "gpu" and low_precision and head_dim % 8 == 0 and head_dim <= 128:
            return "cudnn"
        return "xla"


def lora_options(lora_cfg: LoraConfig | None) -> LoraOptions | None:
    """From the `model.lora` config section; None when `rank` is 0 (full fine-tuning)."""
    if lora_cfg is None or lora_cfg.rank == 0:
        return None
    return LoraOptions(rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                       targets=tuple(lora_cfg.targets))
