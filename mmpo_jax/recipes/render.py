"""The conversion checked by the config loader (`finalize`), and written out as commented
YAML (`render_yaml`) or as one JSON object (`to_json`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
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


# What PyYAML counts as a line break: in a value it would spread the value over lines,
# and in a `#` comment it would end the comment, the rest read as YAML.
_BREAKS = "\n\r\x85\u2028\u2029"
# The characters a comment line keeps as they are: printable, and no line break (YAML's
# reader refuses the other control characters anywhere in the file).
_UNSAFE_IN_COMMENT = re.compile(
    "[^\t\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def _has_break(text: str) -> bool:
    return any(ch in text for ch in _BREAKS)


class _OneLineDumper(yaml.SafeDumper):
    """Writes a string with a line break double-quoted, each break escaped (`\\n`):
    PyYAML's own choice, single quotes, writes it over several lines."""


class _LiteralDumper(yaml.SafeDumper):
    """Writes a string with a line break as a block scalar (`|`), for a template to read
    as it is; PyYAML falls back to double quotes where a block cannot hold it (trailing
    spaces, tabs, non-ASCII)."""


def _string_style(style: str) -> Callable[[yaml.SafeDumper, str], yaml.ScalarNode]:
    def represent(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        chosen = style if _has_break(value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=chosen)

    return represent


_OneLineDumper.add_representer(str, _string_style('"'))
_LiteralDumper.add_representer(str, _string_style("|"))


def flow_yaml(value: Any) -> str:
    """One value as a single line of YAML (flow style), without the document end marker."""
    text = yaml.dump(
        value, Dumper=_OneLineDumper, default_flow_style=True, width=1 << 30, sort_keys=False
    )
    return text.removesuffix("\n...\n").rstrip("\n")


def _entry_lines(key: str, value: Any) -> list[str]:
    """`key: value` as YAML lines: a string with line breaks as a block scalar, which
    reads back equal to it; anything else on one line."""
    if isinstance(value, str) and _has_break(value):
        text = yaml.dump({key: value}, Dumper=_LiteralDumper, width=1 << 30, sort_keys=False)
        # `|+` (trailing blank lines kept) ends the document with `...`, which would end
        # ours there too: such a string goes on one line
        if not text.endswith("\n...\n"):
            return text.rstrip("\n").split("\n")
    return [f"{flow_yaml(key)}: {flow_yaml(value)}"]


def _comment(text: str) -> str:
    """`text` as one `#` line: line breaks and characters YAML refuses are escaped
    (`\\n`, `\\x07`), so no recipe value in it can end the comment."""
    escape = _UNSAFE_IN_COMMENT.sub(
        lambda m: m.group().encode("unicode_escape").decode("ascii"), text
    )
    return f"# {escape}" if escape else "#"


def render_yaml(
    config: Mapping[str, Any],
    conversion: Conversion,
    recipe_name: str,
) -> str:
    """Our config as YAML: a header with assumptions and not-carried keys, then each value
    with a comment naming the recipe key it came from."""
    header = [
        f"Converted from {recipe_name} by `mmpo-jax convert-config`.",
        "Each value's comment names the recipe key it came from; keys not set here keep",
        "our defaults (`mmpo-jax config FILE` prints them all).",
    ]
    if conversion.notes:
        header += ["", "Assumptions and notes:"]
        header += [f"  - {n}" for n in conversion.notes]
    n = len(conversion.skipped)
    header += ["", f"Not carried over ({n} of the recipe's {conversion.keys_read} keys):"]
    if not conversion.skipped:
        header.append("  (none)")
    for s in conversion.skipped:
        header.append(f"  - {s.key}: {_shorten(flow_yaml(s.value))}")
        header.append(f"      {s.reason}")
    lines = [_comment(line) for line in header]
    lines += _block(config, conversion.sources, "", 0)
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != config:  # pragma: no cover - a rendering bug, caught here
        raise AssertionError(f"the rendered config does not read back as converted:\n{text}")
    return text


def _block(
    node: Mapping[str, Any], sources: Mapping[str, str], prefix: str, depth: int
) -> list[str]:
    lines = []
    indent = "  " * depth
    for key, value in node.items():
        path = f"{prefix}{key}"
        source = sources.get(path)
        tail = f"  {_comment(source)}" if source else ""
        if isinstance(value, Mapping) and value:
            lines.append(f"{indent}{flow_yaml(key)}:{tail}")
            lines += _block(value, sources, f"{path}.", depth + 1)
        else:
            # the comment after the first line: after a block scalar's `|` it is still one
            first, *rest = _entry_lines(key, value)
            lines.append(f"{indent}{first}{tail}")
            lines += [f"{indent}{line}" if line else line for line in rest]
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
