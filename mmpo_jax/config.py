"""The run config: typed sections loaded from YAML and `section.key=value` overrides.

One `RunConfig` is the single source of truth for a run. It is built from a
YAML file (which may give only some sections) and command-line overrides
(`loss.beta=0.05`, `optim.learning_rate=5e-7`, `data.train_files=[a.jsonl,b.jsonl]`;
deeper keys take more dots). Every value is converted to the declared type,
and an unknown key, a wrong type or a bad choice stops the run at start with a
`ConfigError` naming the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from mmpo_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem the user can fix; the message says which key and how."""


# --------------------------------------------------------------------------- #
# Sections
# --------------------------------------------------------------------------- #
@dataclass
class ModelConfig:
    """The model. Keys arrive with the model issue."""


@dataclass
class DataConfig:
    """The preference data. Keys arrive with the data issue."""


@dataclass
class OptimConfig:
    """The optimizer. Keys arrive with the train-step issue."""


@dataclass
class LossConfig:
    """The preference loss; names and defaults follow `shared/docs/losses.md`."""

    name: Literal["mmpo", "dpo", "simpo"] = "mmpo"
    # None: the loss's own default (0.1 for mmpo and dpo, 2.0 for simpo).
    beta: float | None = None
    reward_epsilon: float = 1.0
    rejected_epsilon: float = 0.1
    norm_eps: float = 1e-6
    aux_weight: float = 1.0
    normalize: Literal["minmax", "none"] = "minmax"
    entropy_weight: float = 0.0
    entropy_estimator: Literal["token", "score_function"] = "token"
    label_smoothing: float = 0.0
    gamma: float = 1.0
    # None: False for mmpo and dpo, True for simpo (which always averages).
    average_logps: bool | None = None

    def validate(self, prefix: str) -> None:
        if self.beta is None:
            self.beta = 2.0 if self.name == "simpo" else 0.1
        if self.average_logps is None:
            self.average_logps = self.name == "simpo"
        _check(self.beta > 0, prefix, "beta", self.beta, "must be > 0")
        _check(self.norm_eps > 0, prefix, "norm_eps", self.norm_eps, "must be > 0")
        _check(self.aux_weight >= 0, prefix, "aux_weight", self.aux_weight, "must be >= 0")
        _check(
            self.entropy_weight >= 0, prefix, "entropy_weight", self.entropy_weight, "must be >= 0"
        )
        _check(
            0.0 <= self.label_smoothing < 0.5,
            prefix,
            "label_smoothing",
            self.label_smoothing,
            "must be in [0, 0.5)",
        )
        _check(
            not (self.name == "simpo" and self.average_logps is False),
            prefix,
            "average_logps",
            self.average_logps,
            "SimPO always uses length-averaged log-probs; leave it unset or true",
        )


@dataclass
class MeshConfig:
    """Device mesh axis sizes; -1 means "all the devices the others leave"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self, prefix: str) -> None:
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            _check(value == -1 or value >= 1, prefix, name, value, "must be >= 1, or -1 for the rest")
        n_rest = [v for v in (self.data, self.fsdp, self.tensor) if v == -1]
        if len(n_rest) > 1:
            raise ConfigError(
                f"{prefix}: at most one of data, fsdp, tensor may be -1 "
                f"(got data={self.data}, fsdp={self.fsdp}, tensor={self.tensor})"
            )


@dataclass
class TrainConfig:
    """The run: where it writes, how long it runs, its seed."""

    output_dir: str = "runs/default"
    max_steps: int = 1000
    seed: int = 0

    def validate(self, prefix: str) -> None:
        _check(self.max_steps >= 1, prefix, "max_steps", self.max_steps, "must be >= 1")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check(ok: bool, prefix: str, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{prefix}.{key}={value!r}: {rule}")


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
class _OverrideText(str):
    """An override's raw text: str-typed keys take it verbatim, others parse it as YAML."""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML config (or none: all defaults) and applies `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections "
            f"({', '.join(_field_names(RunConfig))}), got {type(raw).__name__}"
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of `raw` with each `a.b.c=value` override set."""
    raw = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override '{item}': '{where}' is a value, not a section")
            node = child
        node[parts[-1]] = _OverrideText(text.strip())
    return raw


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    return raw


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Builds and validates a `RunConfig` from nested plain values."""
    cfg = _build(RunConfig, raw, "")
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if hasattr(section, "validate"):
            section.validate(f.name)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested values (round-trips through `config_from_dict`)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if isinstance(raw, _OverrideText):
        raise ConfigError(f"'{prefix}' is a section with keys, not a value: set '{prefix}.KEY=...'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}: {raw!r}")
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(_unknown_key_message(full, str(key), names, prefix))
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def _unknown_key_message(full: str, key: str, names: list[str], prefix: str) -> str:
    kind = "key" if prefix else "section"
    msg = f"unknown config {kind} '{full}'."
    if names:
        msg += f" Valid {kind}s{' in ' + repr(prefix) if prefix else ''}: {', '.join(sorted(names))}."
    else:
        msg += f" Section '{prefix}' has no keys yet."
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        msg += f" Did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?"
    return msg


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Converts `value` to the declared type `tp`, or raises a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _OverrideText) and value[:1] in ("[", "{"):
        value = _parse_override(value, key)  # a list or mapping, whatever the type

    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)

    if origin in (Union, types.UnionType):
        if _is_null(value) and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for arg in options:
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        if len(options) == 1:
            nullable = " (or null)" if type(None) in args else ""
            raise ConfigError(f"{errors[0]}{nullable}") from None
        raise ConfigError(f"{key}={_shown(value)}: expected {_type_name(tp)}")

    if origin is Literal:
        text = str(value)
        choices = [str(c) for c in args]
        if text not in choices:
            close = difflib.get_close_matches(text, choices, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{key}={_shown(value)}: not a valid choice; choose one of {', '.join(choices)}.{hint}"
            )
        return args[choices.index(text)]

    if isinstance(value, _OverrideText) and tp is not str:
        value = _parse_override(value, key)

    if tp is Any:
        return value
    if tp in (str, bool, int, float) and isinstance(value, dict):
        raise ConfigError(
            f"'{key}' is a value, not a section (got sub-keys {', '.join(map(str, value))})"
        )
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}={_shown(value)}: expected a string")
        return str(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}={_shown(value)}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={_shown(value)}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                # YAML 1.1 reads `5e-7` (no dot) as a string: take it as the number it is.
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={_shown(value)}: expected a number")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={_shown(value)}: expected a list like [a,b]")
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={_shown(value)}: expected a mapping like {{a: 1}}")
        val_tp = args[1] if args else Any
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"config type {tp!r} of {key} is not supported")  # a bug in this file


def _is_null(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, _OverrideText) and value.lower() in ("null", "none", "~", "")


def _parse_override(text: _OverrideText, key: str) -> Any:
    try:
        return yaml.safe_load(str(text)) if text != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"{key}={str(text)!r}: cannot parse the value") from None


def _shown(value: Any) -> str:
    return repr(str(value)) if isinstance(value, _OverrideText) else repr(value)
