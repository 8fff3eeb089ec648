"""transformers' `config.json` <-> `DecoderConfig` for every family: reading transformers
4's `rope_theta`/`rope_scaling` and transformers 5's `rope_parameters` (per layer type
for Gemma 3), the family defaults a file may leave out, and writing a file that both
versions (and vLLM) read back as the same architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmpo_jax.errors import UserError
from mmpo_jax.models.families import (
    FAMILIES,
    HF_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    TEXT_TOWERS,
    pattern_layer_types,
)
from mmpo_jax.models.rope import rope_type

if TYPE_CHECKING:
    from mmpo_jax.models.decoder_config import DecoderConfig

# transformers' defaults for keys a Gemma config.json may leave out (its config classes')
_GEMMA_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {"sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "rope_theta": 10000.0},
    "gemma3": {"sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": None,
               "final_logit_softcapping": None, "rope_theta": 1_000_000.0},
}


# What transformers reads `torch_dtype` / `dtype` as: a torch dtype's name (the ones a
# model's weights come in), or "auto". Nothing here uses it, but any other value says
# the file is not a config transformers wrote, or that it was edited wrongly.
TORCH_DTYPES = ("auto", "float32", "float", "float16", "half", "bfloat16", "float64", "double",
                "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
                "int8", "uint8")
# Switches read with `bool()`, which takes the string "no" for true.
_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "use_bidirectional_attention")


def check_value_types(d: dict[str, Any]) -> None:
    """A UserError naming the key when a switch of `d` is not a JSON boolean (or null), or
    its `torch_dtype` / `dtype` is not a dtype transformers knows."""
    for key in _FLAGS:
        value = d.get(key)
        if value is not None and not isinstance(value, bool):
            raise UserError(f"{key}={value!r} must be true or false (a JSON boolean)")
    for key in ("torch_dtype", "dtype"):
        value = d.get(key)
        name = value.removeprefix("torch.") if isinstance(value, str) else value
        if value is not None and name not in TORCH_DTYPES:
            raise UserError(f"{key}={value!r} is not a dtype transformers knows; use one of "
                            "float32, bfloat16, float16 (or remove the key)")


def text_config(d: dict[str, Any]) -> dict[str, Any]:
    """The decoder's own config: a multimodal config's `text_config`, else `d` itself."""
    if d.get("model_type") in TEXT_TOWERS:
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise UserError(f"a '{d['model_type']}' config.json needs a text_config mapping (its text model)")
        return dict(text)
    return d


def read_hf_config(d: dict[str, Any]) -> dict[str, Any]:
    """`DecoderConfig` keyword arguments from a transformers `config.json` dict."""
    check_value_types(d)
    d = dict(text_config(d))
    check_value_types(d)
    hf_type = d.get("model_type", "llama")
    model_type = HF_MODEL_TYPES.get(hf_type, hf_type)
    if model_type not in SUPPORTED_MODEL_TYPES or hf_type in TEXT_TOWERS:
        raise UserError(f"model_type '{hf_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    family = FAMILIES[model_type]
    defaults = _GEMMA_DEFAULTS.get(model_type, {})
    act = d.get("hidden_activation") or d.get("hidden_act") or family.activation
    if act == "swish":
        act = "silu"
    if act != family.activation:
        raise UserError(f"hidden_act '{act}' is not supported for {model_type} (only {family.activation})")
    if d.get("mlp_bias"):
        raise UserError("mlp_bias=true is not supported")
    if d.get("use_bidirectional_attention"):
        raise UserError("use_bidirectional_attention=true (an encoder) is not supported")
    if d.get("layer_types") and any(t != "full_attention" for t in d["layer_types"]) and (
        model_type in ("qwen2", "qwen3") and d.get("use_sliding_window")
    ):
        raise UserError(f"{model_type} with use_sliding_window=true (per-layer windows) is not supported")

    theta, scaling, local_theta = _read_rope(d, model_type, defaults.get("rope_theta", 10000.0),
                                             family.local_rope_theta)
    sliding = d.get("sliding_window", defaults.get("sliding_window"))
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        sliding = None
    if model_type == "llama":
        sliding = None
    layer_types = None
    if family.window_pattern is not None:
        every = d.get("sliding_window_pattern", family.window_pattern)  # transformers 4's key
        layer_types = tuple(d.get("layer_types") or pattern_layer_types(d["num_hidden_layers"], every))

    hidden = d["hidden_size"]
    heads = d["num_attention_heads"]

    def given(key: str) -> Any:
        return d[key] if key in d else defaults.get(key)

    return dict(
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
        tie_word_embeddings=bool(d.get("tie_word_embeddings", family.gemma_norms)),
        attention_bias=True if family.always_bias else bool(d.get("attention_bias", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        sliding_window=sliding,
        model_type=model_type,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        hidden_act=act,
        layer_types=layer_types,
        rope_local_base_freq=None if local_theta is None else float(local_theta),
        query_pre_attn_scalar=given("query_pre_attn_scalar"),
        attn_logit_softcapping=given("attn_logit_softcapping"),
        final_logit_softcapping=given("final_logit_softcapping"),
    )


def _read_rope(d: dict[str, Any], model_type: str, default_theta: float,
               default_local_theta: float | None) -> tuple[float, dict[str, Any] | None, float | None]:
    """(rope_theta, rope_scaling or None, the sliding layers' own base or None) from
    transformers 5's `rope_parameters` {rope_type, rope_theta, ...} (for Gemma 3 one per
    layer type) or transformers 4's `rope_theta` + `rope_scaling` {rope_type|type, ...}
    (+ Gemma 3's `rope_local_base_freq`)."""
    prf = (d.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    if prf not in (None, 1, 1.0):
        raise UserError(f"partial_rotary_factor={prf} is not supported")
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise UserError(f"rope_parameters must be a mapping, got {params!r}")
    local_theta = d.get("rope_local_base_freq", default_local_theta)
    if params and any(isinstance(v, dict) for v in params.values()):
        if default_local_theta is None:
            raise UserError(f"per-layer-type rope_parameters are not supported for {model_type}")
        local = dict(params.get("sliding_attention") or {})
        if rope_type(local, check=False) != "default":
            raise UserError(f"a '{rope_type(local, check=False)}' RoPE on the sliding layers is not supported")
        local_theta = local.get("rope_theta", local_theta)
        params = params.get("full_attention") or {}
        key = "rope_parameters.full_attention"
    else:
        key = "rope_parameters"
    theta = None
    scaling: dict | None = None
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", None)
        scaling = params
    if theta is None:
        theta = d.get("rope_theta", default_theta)
    if not scaling or rope_type(scaling, check=False) == "default":
        legacy = d.get("rope_scaling")
        if legacy:
            scaling, key = dict(legacy), "rope_scaling"
    if scaling is not None:
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
        scaling.pop("rope_theta", None)
        scaling.pop("partial_rotary_factor", None)
        if rope_type(scaling, key=key) == "default":
            scaling = None
    return theta, scaling, local_theta


def write_hf_config(cfg: DecoderConfig) -> dict[str, Any]:
    """A `config.json` dict that transformers loads as `cfg` (float32)."""
    family = cfg.family
    rope_params: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope_params.update({k: v for k, v in cfg.rope_scaling.items() if k != "rope_type"})
    d: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.hf_model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,
        "rope_parameters": rope_params,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if cfg.model_type == "llama":
        d["attention_bias"] = cfg.attention_bias
        d["mlp_bias"] = False
    elif cfg.model_type == "mistral":
        # Written even when None: MistralConfig's default is 4096.
        d["sliding_window"] = cfg.sliding_window
    elif cfg.model_type in ("qwen2", "qwen3"):
        if cfg.model_type == "qwen3":
            d["attention_bias"] = cfg.attention_bias
        d["use_sliding_window"] = cfg.sliding_window is not None
        d["sliding_window"] = cfg.sliding_window
        d["max_window_layers"] = cfg.num_hidden_layers if cfg.sliding_window is None else 0
    elif family.gemma_norms:
        d.pop("hidden_act")
        d.update({
            "hidden_activation": cfg.hidden_act,
            "attention_bias": cfg.attention_bias,
            "sliding_window": cfg.sliding_window,
            "layer_types": list(cfg.layer_types) if cfg.layer_types is not None else
            ["sliding_attention" if s else "full_attention" for s in cfg.layer_sliding],
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
            "attn_logit_softcapping": cfg.attn_logit_softcapping,
            "final_logit_softcapping": cfg.final_logit_softcapping,
        })
        if cfg.family.local_rope_theta is not None:  # LlamaConfig sets rope_local_base_freq then
            local = cfg.rope_local_base_freq
            d["rope_local_base_freq"] = local
            d["rope_parameters"] = {"full_attention": rope_params,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return d
