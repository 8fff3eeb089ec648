"""What every config section is made of: `ConfigError`, the range check `check`, and
`option`, a dataclass field carrying its help text.

    beta: float | None = option(None, "reward scale", shown="0.1 / 2.0 for simpo")

The help and the shown default are read by `mmpo_jax.config_table`, which writes the
README's configuration table, so a key's meaning is written once, on the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mmpo_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem the user can fix; the message says which key and how."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, shown: str | None = None,
           factory: Callable[[], Any] | None = None, choices: tuple[str, ...] | None = None,
           hint: Callable[[str], str | None] | None = None) -> Any:
    """A config key: its `default` (or a `factory` of it, for a list or a section), its
    `help` (what it means, for the table), `shown` (the default as the table says it,
    where the value alone does not: None that stands for "the loss's own"), `choices`
    (a str key whose choices live elsewhere: checked as their Literal) and `hint` (a
    value another tool names differently -> what to set instead, or None)."""
    metadata: dict[str, Any] = {"help": help}
    if shown is not None:
        metadata["shown"] = shown
    if choices is not None:
        metadata["choices"] = choices
    if hint is not None:
        metadata["hint"] = hint
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(ok: bool, prefix: str, key: str, value: Any, rule: str) -> None:
    """A `ConfigError` naming `prefix.key=value` and the `rule` it breaks, unless `ok`."""
    if not ok:
        raise ConfigError(f"{prefix}.{key}={value!r}: {rule}")
