"""The README's configuration table, made from the schema: one row per key, its default
and its help as the field carries them (`mmpo_jax.config_fields.option`).

    python -m mmpo_jax.config_table           # rewrite README.md's table from the schema
    python -m mmpo_jax.config_table --check   # exit 1 when README.md's table differs

`tests/test_config_table.py` fails when README.md's table is not the one rendered here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from mmpo_jax.config_schema import RunConfig

BEGIN = ("<!-- config table: made by `python -m mmpo_jax.config_table` from the help on the fields "
         "of mmpo_jax/config_schema.py and config_model.py; edit it there -->")
END = "<!-- end of the config table -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def table_rows(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """`(dotted key, default as shown, help)` of every key of `cls`, sections flattened in
    their declared order."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            rows += table_rows(kind, f"{key}.")
            continue
        assert f.metadata.get("help"), f"{key}: give the field its help (config_fields.option)"
        rows.append((key, f.metadata.get("shown") or _shown(_default(f)), f.metadata["help"]))
    return rows


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _shown(value: Any) -> str:
    """A default as YAML writes it: null, true/false, numbers, `strings`, `[lists]`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value).replace("e-0", "e-")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return f"`[{', '.join(map(str, value))}]`"
    return f"`{value}`" if value else '`""`'


def render_table() -> str:
    """The markdown table of every key, between its BEGIN and END markers."""
    lines = [BEGIN, "| key | default | meaning |", "|---|---|---|"]
    # a `|` inside a cell would end it
    lines += [f"| `{key}` | {default} | {meaning.replace('|', chr(92) + '|')} |"
              for key, default, meaning in table_rows()]
    return "\n".join([*lines, END])


def with_table(readme: str) -> str:
    """`readme` with the text between the markers replaced by `render_table()`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no config table markers ({BEGIN!r} ... {END!r})")
    return readme[:start] + render_table() + readme[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write (or --check) README.md's configuration table")
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's table differs")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    wanted = with_table(text)
    if args.check:
        if wanted != text:
            print("README.md's config table differs from the schema: run python -m mmpo_jax.config_table",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
