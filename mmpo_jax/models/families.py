"""The model families: one row each, saying how a family differs from the Llama
decoder. Everything that depends on the family (the config reader, the layers, the
HF tensor table, export) asks this table.

Our `model_type` names a family; `hf_model_types` are the `config.json` model types
read as it (Gemma 3's text model is `gemma3_text`; the multimodal `gemma3` config's
`text_config` is read as its text tower, `text_tower_prefixes` saying where its
tensors live in such a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmpo_jax.choices import MODEL_TYPES


def pattern_layer_types(num_layers: int, every: int) -> tuple[str, ...]:
    """Every `every`-th layer full attention, the others sliding (Gemma's default)."""
    return tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers))


@dataclass(frozen=True)
class Family:
    """How a family's decoder differs from Llama's.

    - `architecture`, `hf_model_type`: what an export's config.json says.
    - `qk_norm`: a per-head RMSNorm over head_dim on q and on k, before RoPE.
    - `o_bias`: `attention_bias` puts a bias on o_proj as well as on q/k/v.
    - `gemma_norms`: RMSNorms scale by `1 + w` (their weights start at 0) in float32
      before the cast back; four norms per layer (`input_layernorm`,
      `post_attention_layernorm` on the attention output, `pre_feedforward_layernorm`,
      `post_feedforward_layernorm` on the MLP output); embeddings times sqrt(hidden).
    - `activation`: the MLP's gate activation ('silu' or 'gelu_pytorch_tanh').
    - `window_pattern`: per-layer sliding windows (Gemma): `layer_types` says which
      layers have one; without it every `window_pattern`-th layer is a full one and the
      rest slide (transformers' default). None: one window for every layer, or none.
    - `local_rope_theta`: the sliding layers' own RoPE base when a config leaves
      `rope_local_base_freq` out (Gemma 3; transformers' default). None: the sliding
      layers share the full layers' RoPE, and a per-layer-type RoPE is refused.
    """

    architecture: str
    hf_model_type: str
    qk_norm: bool = False
    o_bias: bool = False
    gemma_norms: bool = False
    activation: str = "silu"
    window_pattern: int | None = None
    local_rope_theta: float | None = None
    always_bias: bool = False  # Qwen2: q/k/v biases whatever attention_bias says


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "llama", o_bias=True),
    "mistral": Family("MistralForCausalLM", "mistral"),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", always_bias=True),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", qk_norm=True, o_bias=True),
    "gemma2": Family("Gemma2ForCausalLM", "gemma2", o_bias=True, gemma_norms=True,
                     activation="gelu_pytorch_tanh", window_pattern=2),
    "gemma3": Family("Gemma3ForCausalLM", "gemma3_text", qk_norm=True, o_bias=True, gemma_norms=True,
                     activation="gelu_pytorch_tanh", window_pattern=6, local_rope_theta=10000.0),
}
# the names the config checks `model.init.model_type` against, a leaf's (it imports no model)
SUPPORTED_MODEL_TYPES = MODEL_TYPES
assert tuple(FAMILIES) == SUPPORTED_MODEL_TYPES, "one row per mmpo_jax.choices.MODEL_TYPES, in its order"

# config.json model types read as one of ours (besides our own names)
HF_MODEL_TYPES = {"gemma3_text": "gemma3"}
# a multimodal config.json whose `text_config` is one of ours: where its text tower's
# tensors live (transformers 5's layout, then transformers 4's), as prefixes in place
# of `model.` and of `lm_head.`
TEXT_TOWERS: dict[str, dict[str, tuple[str, ...]]] = {
    "gemma3": {"model.": ("model.language_model.", "language_model.model."),
               "lm_head.": ("lm_head.", "language_model.lm_head.")},
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
