"""How a model runs (`ModelOptions`: dtypes, attention kernel, scan, remat, dropout)
and its LoRA adapters (`LoraOptions`); none of these change the architecture or the
checkpoint."""

from __future__ import annotations

import typing
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp

from mmpo_jax.config_schema import LORA_TARGETS, ModelConfig
from mmpo_jax.config_settle import settled_compute_dtype
from mmpo_jax.errors import UserError
from mmpo_jax.models.kernels import KERNELS, KernelChoice, KernelName, Needs, choose_kernel

if TYPE_CHECKING:
    from mmpo_jax.config_schema import LoraConfig
    from mmpo_jax.models.decoder_config import DecoderConfig

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
    - `attention`: the kernel asked for, `model.attention`: 'auto', 'xla', 'cudnn',
      'splash', 'pallas_gpu' (`mmpo_jax.models.kernels.KERNELS` says what each takes).
      `auto`: splash on TPU; on GPU cuDNN with a bf16/fp16 compute dtype, a head_dim up
      to 128 and neither an attention soft-cap nor segment ids; else xla.
    - `scan_layers`: the layers' weights are stacked on a leading `layers` axis and run
      with `nnx.scan`, so compile time does not grow with depth.
    - `remat`: per-layer rematerialisation in the backward pass:
      'none' keeps every activation; 'full' keeps only each layer's input and recomputes
      the layer; 'dots' keeps the outputs of the weight matmuls (no batch dims) and
      recomputes attention and the elementwise ops.
    - `dropout`: rate on the attention and MLP outputs (the residual branches); only
      applied when `Decoder.__call__` gets a `dropout_key`.
    - `lora`: LoRA adapters on some projections (None = none); see the module docstring.
    - `backend`: the backend `auto` choices are settled for ("cpu", "gpu", "tpu"; None:
      this process's); `segments`: the batch layout hands the model segment ids (packed
      rows), which not every kernel takes.
    - `kernel`: the attention kernel the model runs, chosen once for its architecture
      (`for_model`, which the decoder applies when it is built); None until then. It is
      static in the model's graphdef, so nothing switches kernels at trace time.

    Frozen: change a copy with `dataclasses.replace(options, remat="full")`.
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    attention: Literal["auto", "xla", "cudnn", "splash", "pallas_gpu"] = "auto"
    scan_layers: bool = True
    remat: Literal["none", "full", "dots"] = "none"
    dropout: float = 0.0
    lora: LoraOptions | None = None
    backend: str | None = None
    segments: bool = False
    kernel: KernelName | None = None

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
        if self.kernel is not None and self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r}: one of {', '.join(KERNELS)}")
        if self.remat not in REMAT_CHOICES:
            raise UserError(
                f"remat '{self.remat}' is not supported; choose one of {', '.join(REMAT_CHOICES)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must be in [0, 1)")

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, backend: str | None = None,
                    segments: bool = False) -> "ModelOptions":
        """From the `model` config section (`mmpo_jax.config_schema.ModelConfig`), its `auto`
        settled for `backend` ("cpu", "gpu", "tpu"; None: this process's JAX backend),
        so an ahead-of-time compile for a TPU resolves as a TPU run does; `segments`: the
        run's batch layout hands the model segment ids (packed rows)."""
        backend = jax.default_backend() if backend is None else backend
        return cls(
            param_dtype=model_cfg.param_dtype,
            compute_dtype=settled_compute_dtype(model_cfg.compute_dtype, backend),
            attention=model_cfg.attention,
            scan_layers=model_cfg.scan_layers,
            remat=model_cfg.remat,
            dropout=model_cfg.dropout,
            lora=lora_options(model_cfg.lora),
            backend=backend,
            segments=segments,
        )

    @property
    def target(self) -> str:
        """The backend the model runs (or is compiled ahead of time) for: "cpu", "gpu", "tpu"."""
        return self.backend or jax.default_backend()

    def interprets(self, implementation: str) -> bool:
        """Whether a Pallas kernel runs in interpret mode: off the backend it is written
        for (splash: TPU, pallas_gpu: GPU), exact and slow, as the tests run it."""
        return KERNELS[implementation].interprets(self.target)

    @property
    def uses_dropout(self) -> bool:
        """Whether training draws dropout masks (residual or LoRA dropout)."""
        return self.dropout > 0 or (self.lora is not None and self.lora.dropout > 0)

    def attention_choice(self, head_dim: int, soft_cap: bool = False, sliding_window: bool = False
                         ) -> KernelChoice:
        """The kernel `attention` settles on for a model of `head_dim` (`soft_cap`: it caps
        its attention scores, Gemma 2; `sliding_window`: some layers attend within a
        window) on `target` with this layout (`segments`), and `auto`'s reason; a
        `UserError` naming the keys and the fix where the requested kernel cannot run
        (`mmpo_jax.models.kernels.choose_kernel`)."""
        needs = Needs(jnp.dtype(self.compute_dtype).name, self.segments, head_dim, soft_cap, sliding_window)
        return choose_kernel(self.attention, needs, self.target)

    def attention_implementation(self, head_dim: int, soft_cap: bool = False, sliding_window: bool = False
                                 ) -> KernelName:
        """The kernel alone of `attention_choice`: 'xla' or 'cudnn'
        (`jax.nn.dot_product_attention`'s), 'splash' (`mmpo_jax.models.splash`) or
        'pallas_gpu' (`mmpo_jax.models.pallas_gpu`)."""
        return self.attention_choice(head_dim, soft_cap, sliding_window).kernel

    def model_choice(self, arch: DecoderConfig) -> KernelChoice:
        """`attention_choice` for the architecture `arch`."""
        return self.attention_choice(arch.head_dim, soft_cap=arch.attn_logit_softcapping is not None,
                                     sliding_window=arch.sliding_window is not None)

    def for_model(self, arch: DecoderConfig) -> "ModelOptions":
        """These options with `kernel` chosen for `arch` (the same again when it is set)."""
        return replace(self, kernel=self.model_choice(arch).kernel)


def lora_options(lora_cfg: LoraConfig | None) -> LoraOptions | None:
    """From the `model.lora` config section; None when `rank` is 0 (full fine-tuning)."""
    if lora_cfg is None or lora_cfg.rank == 0:
        return None
    return LoraOptions(rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                       targets=tuple(lora_cfg.targets))
