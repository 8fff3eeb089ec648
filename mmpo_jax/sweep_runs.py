"""A sweep's runs as values: the grid, the runs' names (pure), and what became of a run.

Runs. Each `--grid KEY=[V1,V2,...]` is an axis; the runs are the cartesian product
of the axes (the first axis varies slowest). Each `--also "KEY=V KEY=V ..."` adds
ablation runs: every grid combination with these overrides applied on top (they
replace the combination's values for their keys), duplicates dropped. So with
`--grid loss.name=[mmpo,dpo,simpo] --grid loss.beta=[0.1,1.0]`,
`--also "loss.name=mmpo loss.aux_weight=0"` adds one run per beta: `mmpo-beta0.1-aux_weight0`
and `mmpo-beta1.0-aux_weight0` (the dpo and simpo combinations become the same
mmpo runs). The overrides of a run apply after the config's and the sweep's own
`key=value` overrides; `train.output_dir` is set to `OUT/<name>`.

Names. A run's name joins its overrides in order with '-': `loss.name`'s and
`loss.loss_type`'s values alone (`dpo-ipo`, `dpo-sigmoid_sft` for `[sigmoid,sft]`), a number as key+value (`beta0.1`), other values as key_value
(`normalize_none`). The key is its last part (`aux_weight`), or the whole key with
'_' for '.' when two swept keys share a last part. No overrides at all: `base`.

`mmpo_jax.sweep` runs them; `mmpo_jax.sweep_report` summarises their `Outcome`s. Both
import this module and it imports neither, so the two stay one direction apart.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmpo_jax.errors import UserError

PRECISION = 4  # decimals of the summary's floats (and of the sweep's one-line headlines)
RESERVED_KEYS = ("train.output_dir",)  # set by the sweep for each run

Overrides = tuple[tuple[str, str], ...]  # ordered (key, value text) pairs


@dataclass(frozen=True)
class Axis:
    """One `--grid KEY=[V1,...]`: a config key and its values as override text."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its directory name and its overrides, in order."""

    name: str
    overrides: Overrides

    def override_list(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides]

    def value(self, key: str) -> str | None:
        return dict(self.overrides).get(key)


def split_values(text: str) -> list[str]:
    """The values of `[a,b,c]` (commas inside nested brackets or braces stay, so
    `[[q,v],[q,k,v]]` gives `[q,v]` and `[q,k,v]`); text without brackets is one value."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [text]
    inner, parts, depth, start = text[1:-1], [], 0, 0
    for i, ch in enumerate(inner):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [p.strip() for p in parts]


def _key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key):
        raise UserError(f"{flag} {text!r}: expected section.key=value (e.g. loss.beta=0.1)")
    if key in RESERVED_KEYS:
        raise UserError(f"{flag} {text!r}: the sweep sets {key} itself (OUT/<run name>); use --out")
    return key, value.strip()


def parse_grid(text: str) -> Axis:
    """`--grid KEY=[V1,V2,...]` (or `KEY=V`, one value) as an `Axis`."""
    key, value = _key_value(text, "--grid")
    values = split_values(value)
    if any(v == "" for v in values):
        raise UserError(f"--grid {text!r}: an empty value; give KEY=[V1,V2,...]")
    if len(set(values)) != len(values):
        raise UserError(f"--grid {text!r}: a value is repeated")
    return Axis(key, tuple(values))


def parse_also(text: str) -> Overrides:
    """`--also "KEY=V KEY=V ..."` as ordered overrides (shell quoting allowed inside)."""
    items = shlex.split(text)
    if not items:
        raise UserError(f"--also {text!r}: give at least one KEY=VALUE")
    pairs = [_key_value(item, "--also") for item in items]
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise UserError(f"--also {text!r}: a key is given twice")
    return tuple(pairs)


def combinations(axes: Sequence[Axis]) -> list[Overrides]:
    """The cartesian product of the axes, the first axis varying slowest ([()] without axes)."""
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise UserError(f"--grid: key {next(k for k in keys if keys.count(k) > 1)} is given twice")
    return [tuple(zip(keys, values)) for values in itertools.product(*(a.values for a in axes))]


def apply_on_top(base: Overrides, extra: Overrides) -> Overrides:
    """`base` with `extra`'s values replacing its own (a key keeps its place), then
    `extra`'s new keys."""
    merged = dict(base)
    merged.update(extra)
    return tuple(merged.items())


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def name_part(key: str, value: str, label: str) -> str:
    """One override in a run name: `mmpo` for loss.name, `ipo` / `sigmoid_sft` for
    loss.loss_type, `beta0.1`, `normalize_none`."""
    clean = re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_") or "empty"
    if key in ("loss.name", "loss.loss_type"):
        return clean
    return f"{label}{clean}" if _number(value) else f"{label}_{clean}"


def key_labels(keys: Sequence[str]) -> dict[str, str]:
    """Each key's label in run names: its last part, or the whole key (dots as '_')
    when another key has the same last part."""
    last = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts: dict[str, int] = {}
    for k in set(keys):
        counts[last[k]] = counts.get(last[k], 0) + 1
    return {k: last[k] if counts[last[k]] == 1 else k.replace(".", "_") for k in keys}


def run_name(overrides: Overrides, labels: Mapping[str, str]) -> str:
    """The run's directory name: loss.name first, the other overrides in order."""
    ordered = sorted(overrides, key=lambda kv: kv[0] != "loss.name")  # stable
    return "-".join(name_part(k, v, labels.get(k, k)) for k, v in ordered) or "base"


def expand(axes: Sequence[Axis], also: Sequence[Overrides] = ()) -> list[RunSpec]:
    """The runs of a sweep: the grid's combinations, then per `--also` the combinations
    with its overrides on top; a run equal to an earlier one (same overrides, in any
    order) is dropped. Names must come out distinct."""
    sets = combinations(axes)
    for extra in also:
        sets += [apply_on_top(c, extra) for c in combinations(axes)]
    unique: list[Overrides] = []
    seen: set[frozenset] = set()
    for s in sets:
        if frozenset(s) not in seen:
            seen.add(frozenset(s))
            unique.append(s)
    labels = key_labels(sorted({k for s in unique for k, _ in s}))
    runs = [RunSpec(run_name(s, labels), s) for s in unique]
    names = [r.name for r in runs]
    for name in names:
        if names.count(name) > 1:
            same = [" ".join(r.override_list()) for r in runs if r.name == name]
            raise UserError(f"two runs get the name {name!r} ({' | '.join(same)}); write the values alike "
                            "(e.g. 0.1 and 0.10 are the same number)")
    return runs


def series_name(spec: RunSpec) -> str:
    """The run's name without its beta: the runs that one line of the plots joins."""
    rest = tuple((k, v) for k, v in spec.overrides if k != "loss.beta")
    labels = key_labels([k for k, _ in rest])
    return run_name(rest, labels) if rest else "runs"


@dataclass
class Outcome:
    """What became of one run: `status` ok / failed: ..., its eval record (ok runs)."""

    spec: RunSpec
    status: str
    record: dict[str, Any] | None = None
    action: str = ""  # trained / evaluated / skipped / failed


def one_line(err: BaseException) -> str:
    """An error as one line for the summary: its type (unless a user error) and message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"
