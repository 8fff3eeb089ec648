"""What a conversion rule returns (`Part`), what the whole conversion returns
(`Conversion`), and the config loader's verdict on one value (`config_rule`)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mmpo_jax.config_schema import ConfigError, RunConfig
from mmpo_jax.recipes.reading import PLACEHOLDERS

Recipe = Mapping[str, Any]


@dataclass(frozen=True)
class Skipped:
    """A recipe key (or part of one, like `dataset_mixer.X`) that was not carried over."""

    key: str
    value: Any
    reason: str


@dataclass
class Conversion:
    """What `convert_recipe` made of a recipe.

    `config` holds only the keys the recipe set (nested like our YAML),
    `sources` maps each dotted key to the recipe key(s) it came from, and
    `notes` are the assumptions the conversion had to make.
    """

    config: dict[str, dict[str, Any]]
    sources: dict[str, str]
    skipped: list[Skipped]
    notes: list[str]
    keys_read: int


def recipe_key(key: str) -> str:
    """The top-level recipe key of a skipped `key` (`dataset_mixer.X` -> `dataset_mixer`)."""
    return key.split(".")[0].split("[")[0]


@dataclass
class Part:
    """What one rule made of the recipe: our values it sets (dotted keys, in the order
    set) with the recipe key each came from, the keys it could not carry, its notes, and
    every recipe key it read (so the keys nobody read can be listed as unknown)."""

    recipe: Recipe = field(repr=False)
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    read: set[str] = field(default_factory=set)

    def has(self, key: str) -> bool:
        return key in self.recipe

    def raw(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.recipe.get(key, default)

    def get(self, key: str, parse: Callable[[Any], Any], default: Any = None) -> Any:
        """The recipe's value parsed; `default` when absent; None (and listed) when unusable."""
        if key not in self.recipe:
            return default
        value = self.raw(key)
        if isinstance(value, str) and value.strip().lower() in PLACEHOLDERS:
            self.skip(
                key,
                value,
                "a placeholder (the authors' launch scripts pass the real value on the "
                "command line): set it with a key=value override",
            )
            return None
        try:
            return parse(value)
        except ValueError as err:
            self.skip(key, value, str(err))
            return None

    def set(self, path: str, value: Any, source: str) -> None:
        self.values[path] = value
        self.sources[path] = source

    def skip(self, key: str, value: Any, reason: str) -> None:
        self.read.add(recipe_key(key))
        self.skipped.append(Skipped(key, value, reason))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def origin(self, key: str, default: str = "TRL's default") -> str:
        """A value's source: the recipe key, or the library default it fell back to."""
        return key if self.has(key) else default

    def add(self, other: Part) -> None:
        """Takes in what a sub-rule made, after what this part holds."""
        self.values.update(other.values)
        self.sources.update(other.sources)
        self.skipped += other.skipped
        self.notes += other.notes
        self.read |= other.read


def config_rule(path: str, value: Any, **others: Any) -> str | None:
    """The rule of `mmpo_jax.config` that refuses `path=value`, in its own words; None when
    the config takes the value.

    `path` is our dotted key (`optim.b1`, `model.lora.dropout`, `data.mixture.SOURCE`);
    `others` are keys of the same section the rule reads alongside (`max_length` for
    `max_prompt_length`, `name` for `average_logps`); the rest keep our defaults. Only
    the sections' `validate` rules are asked, as the value is already parsed: the loader's
    type checks (a finite number, ...) stay with `finalize`, which stops on a bad value.
    """
    names = path.split(".")
    section: Any = RunConfig
    depth = 0
    while dataclasses.is_dataclass(hint := typing.get_type_hints(section)[names[depth]]):
        section, depth = hint, depth + 1
    prefix, key, entry = ".".join(names[:depth]), names[depth], names[depth + 1 :]
    # a deeper path names an entry of a mapping key (the source of data.mixture)
    # unsettled, as config_from_dict validates what was written (an unset key is its default)
    node = section(**others, **{key: {".".join(entry): value} if entry else value})
    try:
        node.validate(prefix)
    except ConfigError as err:
        named = f"{path}={value!r}: "
        # a refusal of another key (one of `others`) is left to the whole config's check
        return str(err).removeprefix(named) if str(err).startswith(named) else None
    return None
