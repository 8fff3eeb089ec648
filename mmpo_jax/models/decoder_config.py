"""The decoder's architecture (`DecoderConfig`, transformers' names): reading and
writing transformers' `config.json` (transformers 4's `rope_theta`/`rope_scaling`,
transformers 5's `rope_parameters`), and a random init's architecture from the
`model.init` config section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmpo_jax.errors import UserError
from mmpo_jax.models.families import (
    ACTIVATIONS,
    FAMILIES,
    LAYER_TYPES,
    SUPPORTED_MODEL_TYPES,
    Family,
    pattern_layer_types,
)
from mmpo_jax.models.hf_config import read_hf_config, write_hf_config
from mmpo_jax.models.rope import rope_type as _rope_type

if TYPE_CHECKING:
    from mmpo_jax.config_schema import ModelInit


@dataclass(frozen=True)
class DecoderConfig:
    """The architecture of any supported family, with transformers' field names.

    `model_type` names the family (`mmpo_jax.models.families`: what it adds to the
    Llama decoder). `rope_scaling` is None (plain RoPE) or a dict with a `rope_type`
    of `mmpo_jax.models.rope`. `attention_bias` adds q/k/v biases (and o_proj's where
    the family has one). `sliding_window`: a layer with a window attends to the last
    `sliding_window` positions including the current one; `layer_types` (Gemma) says
    per layer which have it ('sliding_attention') and which attend to everything
    ('full_attention'); None: every layer has the window, or none when it is None.
    `rope_local_base_freq` (Gemma 3): the sliding layers' own RoPE base (plain RoPE),
    the full layers keep `rope_theta` and `rope_scaling`. `query_pre_attn_scalar`: the
    attention scale is its inverse square root (None: head_dim's).
    `attn_logit_softcapping` / `final_logit_softcapping` (Gemma 2): `c * tanh(x / c)`
    on the attention scores / the LM's logits.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # None at construction: derived in __post_init__ (all heads; hidden / heads; the
    # family's activation), so an instance always holds a value
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
    hidden_act: str = None  # type: ignore[assignment]
    layer_types: tuple[str, ...] | None = None
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model_type '{self.model_type}' is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.hidden_act is None:
            object.__setattr__(self, "hidden_act", self.family.activation)
        if isinstance(self.eos_token_id, tuple):
            object.__setattr__(self, "eos_token_id", list(self.eos_token_id))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        elif self.family.window_pattern is not None and self.sliding_window is not None:
            object.__setattr__(self, "layer_types",
                               pattern_layer_types(self.num_hidden_layers, self.family.window_pattern))
        if self.rope_local_base_freq is None and self.family.local_rope_theta is not None:
            object.__setattr__(self, "rope_local_base_freq", self.family.local_rope_theta)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UserError(f"sliding_window={self.sliding_window} must be >= 1 or null")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"activation '{self.hidden_act}' is not supported; supported: {', '.join(ACTIVATIONS)}")
        self._check_layer_types()
        for key in ("rope_local_base_freq", "query_pre_attn_scalar", "attn_logit_softcapping",
                    "final_logit_softcapping"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise UserError(f"{key}={value} must be > 0 or null")
        _rope_type(self.rope_scaling)  # validates

    def _check_layer_types(self) -> None:
        types = self.layer_types
        if types is None:
            return
        if self.family.window_pattern is None:
            raise UserError(f"layer_types (per-layer attention) are not supported for model_type '{self.model_type}'")
        bad = sorted({t for t in types if t not in LAYER_TYPES})
        if bad:
            raise UserError(f"layer_types {bad} are not supported; supported: {', '.join(LAYER_TYPES)}")
        if len(types) != self.num_hidden_layers:
            raise UserError(f"layer_types lists {len(types)} layers, num_hidden_layers={self.num_hidden_layers}")
        if "sliding_attention" in types and self.sliding_window is None:
            raise UserError("layer_types has sliding_attention layers but sliding_window is null")

    # Hashable although it holds a dict (rope_scaling) and maybe a list (eos ids):
    # the config is a static argument of jitted functions.
    def __hash__(self) -> int:
        return hash(repr(self))

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def rope_type(self) -> str:
        return _rope_type(self.rope_scaling)

    @property
    def context_length(self) -> int:
        """The positions the model was trained to read: `max_position_embeddings`, stretched by
        linear and YaRN scaling's `factor` over the original length (Qwen's YaRN recipe keeps
        max_position_embeddings at the original); llama3 scaling's configs already give the
        extended length there."""
        if self.rope_type in ("linear", "yarn"):
            assert self.rope_scaling is not None
            original = self.rope_scaling.get("original_max_position_embeddings") or self.max_position_embeddings
            return max(self.max_position_embeddings, int(float(self.rope_scaling["factor"]) * original))
        return self.max_position_embeddings

    @property
    def layer_sliding(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through `sliding_window`."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_hidden_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def o_bias(self) -> bool:
        """Whether o_proj has a bias: `attention_bias` in families that put one there."""
        return self.attention_bias and self.family.o_bias

    @property
    def qk_norm(self) -> bool:
        """A per-head RMSNorm over `head_dim` on q and on k, before RoPE (Qwen3, Gemma 3)."""
        return self.family.qk_norm

    @classmethod
    def from_hf_dict(cls, d: dict) -> "DecoderConfig":
        """Reads a transformers `config.json` dict (transformers 4 or 5 style; of a
        multimodal model in `TEXT_TOWERS`, its `text_config`).

        Unsupported model types, rope types, activations and options raise a
        `UserError` naming them.
        """
        return cls(**read_hf_config(d))

    def to_hf_dict(self) -> dict:
        """A `config.json` dict that transformers loads as this architecture (float32).

        Writes both transformers 5's `rope_parameters` and transformers 4's
        `rope_theta`/`rope_scaling`, so older readers (and vLLM) agree.
        """
        return write_hf_config(self)


def model_config_from_init(init: ModelInit) -> DecoderConfig:
    """The `DecoderConfig` of a random init from the `model.init` config section: read as
    the config.json it amounts to, so a family's defaults (Gemma's windows, soft-caps,
    RoPE bases) are the ones its checkpoints get."""
    d: dict[str, Any] = {
        "model_type": FAMILIES[init.model_type].hf_model_type,
        "vocab_size": init.vocab_size,
        "hidden_size": init.hidden_size,
        "intermediate_size": init.intermediate_size,
        "num_hidden_layers": init.num_hidden_layers,
        "num_attention_heads": init.num_attention_heads,
        "num_key_value_heads": init.num_key_value_heads,
        "head_dim": init.head_dim,
        "rms_norm_eps": init.rms_norm_eps,
        "rope_theta": init.rope_theta,
        "tie_word_embeddings": init.tie_word_embeddings,
        "max_position_embeddings": init.max_position_embeddings,
        "attention_bias": init.attention_bias,
    }
    if init.sliding_window is not None:
        d["sliding_window"] = init.sliding_window
        d["use_sliding_window"] = True  # Qwen's switch for its window
    return DecoderConfig.from_hf_dict(d)
