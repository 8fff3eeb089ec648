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
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from mmpo_jax.config_schema import ConfigError, RunConfig
from mmpo_jax.config_settle import BUILTIN_PREFIX, settle
from mmpo_jax.losses.declarations import DECLARATIONS, REFERENCE_FREE_LOSSES


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
class _OverrideText(str):
    """An override's raw text: str-typed keys take it verbatim, others parse it as YAML."""


def split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """`CONFIG [key=value ...]` as `(CONFIG, overrides)`: the first item is a config
    file unless it is a key=value override (then CONFIG is None)."""
    items = list(items)
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML config (or none: all defaults), with its `base:` chain, and applies
    `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_config_file(Path(path))
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw)


# A config may start from another: `base: other.yaml` (relative to the file naming it)
# at the top level, then only the keys that differ. Deeper than this is a mistake.
MAX_BASE_DEPTH = 8


def read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping on top of its `base:` (recursively): each section of the file
    replaces the base's keys one by one (sub-sections such as `model.lora` too), a value
    (a list, `data.mixture`) replaces the base's whole."""
    raw = _read_yaml(path)
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base={base!r}: must be the path of another config file (relative to this one)")
    base_path = (path.parent / os.path.expanduser(base)).resolve()
    chain = (*chain, path.resolve())
    if base_path in chain:
        loop = " -> ".join(str(p) for p in (*chain, base_path))
        raise ConfigError(f"{path}: base={base!r} makes a loop ({loop}); a config cannot start from itself")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: base={base!r}: more than {MAX_BASE_DEPTH} files deep; start from a nearer base")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base={base!r}: no such file '{base_path}'")
    return _merge_sections(read_config_file(base_path, chain), raw, RunConfig)


def _merge_sections(base: dict[str, Any], top: dict[str, Any], cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    merged = dict(base)
    for key, value in top.items():
        kind = hints.get(key)
        if (isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, dict)
                and isinstance(merged.get(key), dict)):
            merged[key] = _merge_sections(merged[key], value, kind)
        else:
            merged[key] = value
    return merged


def config_from_text(text: str, overrides: Sequence[str] = (), where: str = "the config") -> RunConfig:
    """`load_config` of YAML text (a checkpoint's saved config); errors name `where`."""
    return config_from_dict(apply_overrides(_parse_yaml(text, where), overrides))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'")
    return _parse_yaml(path.read_text(encoding="utf-8"), str(path))


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if raw is None:
        return {}
    _check_expanded_size(raw, where)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: the top level must be a mapping of sections "
            f"({', '.join(_field_names(RunConfig))}), got {type(raw).__name__}"
        )
    return raw


# A run config has a few hundred values; YAML aliases can make a 900-byte file expand
# to billions (an "alias bomb"), which copying the mapping would try to build.
MAX_CONFIG_NODES = 100_000


def _check_expanded_size(raw: Any, where: str) -> None:
    """Counts the values `raw` expands to (each alias use again), stopping at the bound."""
    seen, stack = 0, [raw]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{where}: expands to more than {MAX_CONFIG_NODES} values (YAML aliases used over and over?); "
                "a run config needs a few hundred: write the values out"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


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
    """Builds, checks and settles a `RunConfig` from nested plain values: the one place a
    config is checked. Each section's `validate` checks what was written (a key left unset
    is its default, valid by construction), `settle` fills the defaults and `auto`s, and the
    rules across sections read the settled config. The result is frozen (every section),
    so nothing after this can change what was validated; a variant is `dataclasses.replace`
    of a section and goes through `config_from_dict(config_to_dict(...))` to be checked again."""
    cfg = _build(RunConfig, raw, "")
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if hasattr(section, "validate"):
            section.validate(f.name)
    settled = settle(cfg)
    _check_reference(settled)
    _check_tokenizer(cfg)
    return _expand_home(settled)


# The keys that name local files or directories (a hub id or `builtin:`/`pkg:` spec
# never starts with "~", so expanding those leaves them as they are).
PATH_KEYS = ("model.path", "model.reference_path", "data.train_files", "data.test_files", "data.mixture",
             "data.tokenizer", "data.chat_template", "data.cache_dir", "train.output_dir")


def _expand_home(cfg: RunConfig) -> RunConfig:
    """`~` and `~user` in path keys become the home directory, as a shell would expand them
    (unexpanded, `train.output_dir=~/runs/x` made a directory literally named `~`)."""
    for key in PATH_KEYS:
        section_name, name = key.split(".")
        section = getattr(cfg, section_name)
        value = getattr(section, name)
        if isinstance(value, str):
            value = os.path.expanduser(value)
        elif isinstance(value, list):
            value = [os.path.expanduser(v) for v in value]
        elif isinstance(value, dict):
            value = {os.path.expanduser(k): v for k, v in value.items()}
        cfg = dataclasses.replace(cfg, **{section_name: dataclasses.replace(section, **{name: value})})
    return cfg


def _check_tokenizer(cfg: RunConfig) -> None:
    """A builtin tokenizer with a checkpoint is an error (read as written: `settle` gives an
    unset `data.tokenizer` the model's own)."""
    data, path = cfg.data, cfg.model.path
    if path and data.tokenizer.startswith(BUILTIN_PREFIX):
        # builtin:tiny's 2048 ids fit most embeddings, so a checkpoint trained silently on
        # the wrong tokens (eval log-probs -74 instead of -11) before this was refused
        raise ConfigError(
            f"data.tokenizer={data.tokenizer!r} is the tokenizer of a random init (model.path: \"\"), but "
            f"model.path={path!r} names a checkpoint trained with its own tokens: remove data.tokenizer "
            "to use the checkpoint's own tokenizer, or name that model's tokenizer (a directory, a hub id "
            "or a .gguf file)"
        )


def _check_reference(cfg: RunConfig) -> None:
    """A settled `model.reference` the loss or `model.sync_reference` cannot use is an error."""
    model, loss = cfg.model, cfg.loss
    if model.sync_reference and model.reference != "separate":
        why = {
            "lora_base": "the reference is the policy's own base weights, nothing to mix into",
            "precomputed": "the precomputed log-probs are of a fixed reference",
            "none": f"loss.name={loss.name} runs without a reference",
        }[model.reference]
        raise ConfigError(f"model.sync_reference=true needs model.reference=separate (it is "
                          f"{model.reference}: {why}); set model.sync_reference=false or use separate")
    if loss.name not in REFERENCE_FREE_LOSSES and model.reference == "none":
        raise ConfigError(
            f"model.reference=none: loss.name={loss.name} needs reference log-probs; "
            "use separate, lora_base (with LoRA) or precomputed "
            f"(only {' and '.join(REFERENCE_FREE_LOSSES)} run without a reference)"
        )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested values (round-trips through `config_from_dict`)."""
    return dataclasses.asdict(cfg)


def unused_keys(cfg: RunConfig) -> list[str]:
    """The dotted keys (a section for a whole block) whose values the run does not read:
    `model.init` when `model.path` names a checkpoint, the `loss.*` keys its loss does not read
    (`LossDeclaration.config_keys`). What is shown to a person (`mmpo-jax config`, trackers'
    params) leaves them out; the run's config.yaml keeps every key."""
    read = set(DECLARATIONS[cfg.loss.name].config_keys)
    keys = ["model.init"] if cfg.model.path else []
    return keys + [f"loss.{f.name}" for f in dataclasses.fields(cfg.loss) if f.name not in read]


def applicable_dict(cfg: RunConfig) -> dict[str, Any]:
    """`config_to_dict(cfg)` less `unused_keys(cfg)`."""
    data = config_to_dict(cfg)
    for key in unused_keys(cfg):
        section, name = key.split(".")
        del data[section][name]
    return data


def config_to_yaml(cfg: RunConfig) -> str:
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
    # a str field whose choices live elsewhere (`loss.name`: the loss declarations) is
    # checked as the Literal of them
    for f in dataclasses.fields(cls):
        if "choices" in f.metadata:
            hints[f.name] = Literal[tuple(f.metadata["choices"])]
    names = _field_names(cls)
    hint_of = {f.name: f.metadata["hint"] for f in dataclasses.fields(cls) if "hint" in f.metadata}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(_unknown_key_message(full, str(key), names, prefix))
        try:
            kwargs[key] = _convert(value, hints[key], full)
        except ConfigError:
            # a value another tool names differently: say what it is called here
            hint = hint_of[key](str(value)) if key in hint_of else None
            if hint is None:
                raise
            raise ConfigError(f"{full}={_shown(value)}: {hint}") from None
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

    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                # YAML 1.1 reads `5e-7` (no dot) as a string: take it as the number it is.
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={_shown(value)}: expected a number")
        if not math.isfinite(number):
            # no setting means anything at inf or nan: optim.learning_rate=inf trained NaN
            # weights that were saved as a good checkpoint
            raise ConfigError(f"{key}={_shown(value)}: must be a finite number")
        return number
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
        value = yaml.safe_load(str(text)) if text != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"{key}={_shown(text)}: cannot parse the value") from None
    # an override's aliases expand like a file's (converting them copied every reference: a
    # 900-byte alias bomb hung for minutes)
    _check_expanded_size(value, f"the override {key}=...")
    return value


# The longest value an error message quotes (an override or a file can hold megabytes).
SHOWN_CHARS = 200


def _shown(value: Any) -> str:
    text = repr(str(value)) if isinstance(value, _OverrideText) else repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"
