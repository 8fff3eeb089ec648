"""Reading a recipe file, and parsing its values as HfArgumentParser would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mmpo_jax.config import _check_expanded_size
from mmpo_jax.config_schema import ConfigError
from mmpo_jax.errors import UserError

# Values the MMPO authors' recipes leave for their launch scripts to fill in.
PLACEHOLDERS = frozenset({"dummy"})


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe file as a mapping; a UserError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: '{path}'")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(
            f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}"
        ) from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty; expected a mapping of recipe keys")
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: a recipe must be a mapping of keys like model_name_or_path, beta, "
            f"learning_rate (an alignment-handbook / TRL recipe), got a {type(raw).__name__}"
        )
    try:
        # the config loader's bound on YAML aliases: every skipped value is printed in full
        _check_expanded_size(raw, str(path))
    except ConfigError as err:
        raise UserError(str(err)) from None
    return raw


# Each parser returns the value or raises ValueError with the reason it is unusable.
_TRUE = {"true", "yes", "y", "1", "on"}
_FALSE = {"false", "no", "n", "0", "off"}


def as_bool(value: Any) -> bool:
    # HfArgumentParser's string_to_bool: recipes write yes/no as often as true/false.
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
        return str(value).strip().lower() in _TRUE
    raise ValueError("expected true or false")


def as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")  # noqa: TRY004 (each parser raises ValueError)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            # YAML 1.1 reads `5e-7` (no dot) as a string: recipes mean the number.
            return float(value)
        except ValueError:
            pass
    raise ValueError("expected a number")


def as_int(value: Any) -> int:
    number = as_float(value)
    if not number.is_integer():
        raise ValueError("expected a whole number")
    return int(number)


def as_str(value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise ValueError("expected a string")
    return str(value)


def as_str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        # transformers accepts a comma-separated string for list arguments
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError("expected a list of strings")


def is_off(value: Any) -> bool:
    """A value that asks for nothing: false, null, empty, 'no', 'none'."""
    if value is None or value is False:
        return True
    if isinstance(value, (str, list, dict, tuple)) and len(value) == 0:
        return True
    return isinstance(value, str) and value.strip().lower() in {"no", "none", "false"}
