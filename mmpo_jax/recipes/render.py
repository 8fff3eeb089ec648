"""The conversion checked by the config loader (`finalize`), and written out as commented
YAML (`render_yaml`) or as one JSON object (`to_json`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from mmpo_jax.config import apply_overrides, config_from_dict
from mmpo_jax.config_schema import RunConfig
from mmpo_jax.recipes.part import Conversion


def finalize(
    conversion: Conversion, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], RunConfig]:
    """Applies `key=value` overrides, validates, and returns `(our keys, typed, as set; RunConfig)`.

    The returned mapping holds exactly the keys the recipe and the overrides set,
    converted to their declared types, so it loads back to the same RunConfig.
    """
    raw = apply_overrides(conversion.config, overrides)
    cfg = config_from_dict(raw)
    for item in overrides:
        conversion.sources[item.partition("=")[0].strip()] = "override"
    return _pick(cfg, raw), cfg


def _pick(node: Any, raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw_value in raw.items():
        value = getattr(node, key)
        if dataclasses.is_dataclass(value) and isinstance(raw_value, Mapping):
            out[key] = _pick(value, raw_value)
        else:
            out[key] = value
    return out


def flow_yaml(value: Any) -> str:
    """One value as a single line of YAML (flow style), without the document end marker."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False)
    return text.removesuffix("\n...\n").rstrip("\n")


def render_yaml(
    config: Mapping[str, Any],
    conversion: Conversion,
    recipe_name: str,
) -> str:
    """Our config as YAML: a header with assumptions and not-carried keys, then each value
    with a comment naming the recipe key it came from."""
    lines = [
        f"# Converted from {recipe_name} by `mmpo-jax convert-config`.",
        "# Each value's comment names the recipe key it came from; keys not set here keep",
        "# our defaults (`mmpo-jax config FILE` prints them all).",
    ]
    if conversion.notes:
        lines += ["#", "# Assumptions and notes:"]
        lines += [f"#   - {n}" for n in conversion.notes]
    n = len(conversion.skipped)
    lines += ["#", f"# Not carried over ({n} of the recipe's {conversion.keys_read} keys):"]
    if not conversion.skipped:
        lines.append("#   (none)")
    for s in conversion.skipped:
        lines.append(f"#   - {s.key}: {_shorten(flow_yaml(s.value))}")
        lines.append(f"#       {s.reason}")
    lines += _block(config, conversion.sources, "", 0)
    return "\n".join(lines) + "\n"


def _block(
    node: Mapping[str, Any], sources: Mapping[str, str], prefix: str, depth: int
) -> list[str]:
    lines = []
    indent = "  " * depth
    for key, value in node.items():
        path = f"{prefix}{key}"
        source = sources.get(path)
        comment = f"  # {source}" if source else ""
        if isinstance(value, Mapping) and value:
            lines.append(f"{indent}{flow_yaml(key)}:{comment}")
            lines += _block(value, sources, f"{path}.", depth + 1)
        else:
            lines.append(f"{indent}{flow_yaml(key)}: {flow_yaml(value)}{comment}")
    return lines


def _shorten(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_json(config: Mapping[str, Any], conversion: Conversion, recipe_name: str) -> dict[str, Any]:
    """The `--json` report: our config, each value's source, the notes and the keys not carried."""
    return {
        "recipe": recipe_name,
        "config": config,
        "sources": conversion.sources,
        "notes": conversion.notes,
        "not_carried": [
            {"key": s.key, "value": s.value, "reason": s.reason} for s in conversion.skipped
        ],
    }
