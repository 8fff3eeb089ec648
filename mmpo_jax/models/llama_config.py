"""The Llama family's architecture (`LlamaConfig`, transformers' names): reading and
writing transformers' `config.json` (transformers 4's `rope_theta`/`rope_scaling`,
transformers 5's `rope_parameters`), and a random init's architecture from the
`model.init` config section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmpo_jax.errors import UserError

if TYPE_CHECKING:
    from mmpo_jax.config_schema import ModelInit

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture, with transformers' field names.

    `rope_scaling` is None (plain RoPE) or a dict with `rope_type` 'linear'
    (`factor`) or 'llama3' (`factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`). `attention_bias` adds q/k/v biases
    (Qwen2; for model_types 'llama' and 'qwen3' transformers also puts one on o_proj,
    and so do we). `model_type` 'qwen3' adds a per-head RMSNorm on q and k (`qk_norm`).
    `sliding_window` (Mistral) limits attention to the last `sliding_window` positions
    including the current one.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # None at construction: derived in __post_init__ (all heads; hidden / heads), so an
    # instance always holds an int
    num_key_value_heads: int = None  # type: ignore[assignment]
    head_dim: int = None  # type: ignore[assignment]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
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
            model_type in ("qwen2", "qwen3") and d.get("use_sliding_window")
        ):
            raise UserError(f"{model_type} with use_sliding_window=true (per-layer windows) is not supported")

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
        if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
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
        elif self.model_type in ("qwen2", "qwen3"):
            if self.model_type == "qwen3":
                d["attention_bias"] = self.attention_bias
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = self.num_hidden_layers if self.sliding_window is None else 0
        return d

    @property
    def o_bias(self) -> bool:
        """transformers' Llama and Qwen3 put `attention_bias` on o_proj too; Qwen2 does not."""
        return self.attention_bias and self.model_type in ("llama", "qwen3")

    @property
    def qk_norm(self) -> bool:
        """Qwen3: a per-head RMSNorm over `head_dim` on q and on k, before RoPE."""
        return self.model_type == "qwen3"


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


def model_config_from_init(init: ModelInit) -> LlamaConfig:
    """The `LlamaConfig` of a random init from the `model.init` config section."""
    return LlamaConfig(
        vocab_size=init.vocab_size,
        hidden_size=init.hidden_size,
        intermediate_size=init.intermediate_size,
        num_hidden_layers=init.num_hidden_layers,
        num_attention_heads=init.num_attention_heads,
        num_key_value_heads=init.num_key_value_heads,
        head_dim=init.head_dim,  # type: ignore[arg-type]  # None: derived, as LlamaConfig says
        rms_norm_eps=init.rms_norm_eps,
        rope_theta=init.rope_theta,
        tie_word_embeddings=init.tie_word_embeddings,
        max_position_embeddings=init.max_position_embeddings,
    )
