"""RoPE: the rope types we take (their parameters checked by name), the inverse
frequencies and the cos/sin scale each gives, as transformers computes them.

A rope type is `default` (no scaling dict), `linear` (`factor`), `llama3` (`factor`,
`low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`) or `yarn`
(`factor`; optional `original_max_position_embeddings` (default the model's
`max_position_embeddings`), `attention_factor`, `beta_fast`, `beta_slow`, `mscale`,
`mscale_all_dim`, `truncate`). Any other type is refused naming it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mmpo_jax.errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}
# The largest scaling factor taken: far above any released model's (Llama 3.1: 8, Llama 4:
# 16, DeepSeek-V3's YaRN: 40), while a factor like 1e308 makes the stretched context
# infinite and divides every frequency to 0 (all positions alike), with no error.
MAX_ROPE_FACTOR = 1024.0


def rope_type(scaling: dict[str, Any] | None, check: bool = True, key: str = "rope_scaling") -> str:
    """The rope type of a scaling dict (None or empty: 'default'); with `check`, an
    unsupported type or a missing or unusable parameter is a `UserError` naming it (as
    `key.<parameter>`: where the config.json holds the dict)."""
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if not check:
        return kind
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UserError(f"rope type '{kind}' is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    missing = [k for k in _REQUIRED.get(kind, ()) if scaling.get(k) is None]
    if missing:
        raise UserError(f"rope type '{kind}' needs {', '.join(missing)}")
    problem = scaling_problem(scaling) if kind != "default" else None  # default ignores them all
    if problem is not None:
        name, rule = problem
        raise UserError(f"{key}.{name}={scaling[name]!r} {rule} (rope type '{kind}')")
    return kind


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scaling_problem(scaling: dict[str, Any]) -> tuple[str, str] | None:
    """The first parameter of a scaling dict that `inv_freq` cannot use, as `(name, rule)`;
    None if none. Each of these would give NaN or infinite frequencies, a math domain
    error, or a context length that overflows, rather than an error naming it."""
    factor = scaling.get("factor")
    if factor is not None and not (_number(factor) and 0 < factor <= MAX_ROPE_FACTOR):
        return "factor", f"must be a number > 0 and <= {MAX_ROPE_FACTOR:g} (released models use up to 40)"
    for name in ("low_freq_factor", "high_freq_factor", "attention_factor"):
        value = scaling.get(name)
        if value is not None and not (_number(value) and value > 0):
            return name, "must be a positive number"
    for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        value = scaling.get(name)
        if value is not None and not (_number(value) and value >= 0):
            return name, "must be a number >= 0"
    original = scaling.get("original_max_position_embeddings")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        return "original_max_position_embeddings", "must be a positive integer"
    if "truncate" in scaling and not isinstance(scaling["truncate"], bool):
        return "truncate", "must be true or false"
    return None


def inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
             max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """The inverse frequencies `[head_dim // 2]` (float32) and the factor cos and sin are
    multiplied by (1.0 except for yarn), as transformers' rope init functions give them."""
    dim = head_dim
    base = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    base = base.astype(np.float32)
    kind, s = rope_type(scaling), scaling or {}
    if kind == "linear":
        return (base / np.float32(s["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(base, s), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, s, max_position_embeddings)
    return base, 1.0


def _llama3(inv: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    factor = s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    low_wavelen = old / low
    high_wavelen = old / high
    wavelen = 2 * math.pi / inv
    inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
    # equal factors (Llama 4's) leave no medium band: the smoothing, 0/0 there, is never used
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_l).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, s: dict[str, Any], max_positions: int) -> tuple[np.ndarray, float]:
    """YaRN (arXiv 2309.00071): interpolated frequencies below the correction range,
    extrapolated ones above it, a linear ramp between; cos/sin scaled by its mscale."""
    factor = float(s["factor"])
    original = s.get("original_max_position_embeddings") or max_positions
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    keep = 1 - ramp  # the share of each frequency left unscaled
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32), float(attention_factor)
