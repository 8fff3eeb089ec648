"""Rows of `.json` / `.jsonl` files, read line by line so a bad line has a number.

A JSON lines file is read one line at a time; blank lines are skipped. A `.json`
file may instead hold one JSON document: a list of objects, one object, or an
object with one list of objects (`{"data": [...]}`).

With `bad_lines="raise"` (the default: `generate --prompts`, the win rate) the
first bad line stops the read with its number and column. With
`bad_lines="collect"` (the training data) a bad line becomes a bad row, kept in
`RawRows.bad` with its reason (`invalid_json`, `not_an_object`), so a stray
line among thousands is dropped and counted like any other bad row. A `.json`
document that does not parse (it starts with `[`, or its first line is not JSON
on its own: a pretty-printed document) always stops the read, with line and column:
its lines are not rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from mmpo_jax.errors import UserError

BadLines = Literal["raise", "collect"]
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"


class BadLine(NamedTuple):
    number: int  # 1-based line (or row of a document)
    reason: str  # INVALID_JSON or NOT_AN_OBJECT
    detail: str  # what is wrong, for the first error of a report


@dataclass
class RawRows:
    """A source's rows as read: plain dicts, with the number a user would look up."""

    name: str
    rows: list[dict[str, Any]]
    numbers: list[int]  # 1-based line numbers (JSON lines) or row indices
    label: Literal["line", "row"]
    columns: list[str]
    bad: list[BadLine] = field(default_factory=list)  # only with bad_lines="collect"


def read_json_rows(path: Path, key: str, bad_lines: BadLines = "raise") -> RawRows:
    """Rows of a JSON lines file or a `.json` document; `key` names the source in errors."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        data = data[3:]
    if path.suffix.lower() == ".json":
        doc = _json_document_rows(data, path, key, bad_lines)
        if doc is not None:
            rows, numbers, bad = doc
            return RawRows(str(path), rows, numbers, "row", _columns(rows), bad)
    rows, numbers, bad = [], [], []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        item, problem = _parse_line(line)
        if problem is not None:
            if bad_lines == "raise":
                raise UserError(
                    f"{key}: '{path}' line {n}{problem}; "
                    "each line must be one JSON object: fix or remove the line"
                )
            bad.append(BadLine(n, INVALID_JSON, f"line {n}{problem}"))
        elif not isinstance(item, dict):
            if bad_lines == "raise":
                raise UserError(_not_object(f"{key}: '{path}' line {n}", item))
            bad.append(BadLine(n, NOT_AN_OBJECT, _not_object(f"line {n}", item)))
        else:
            rows.append(item)
            numbers.append(n)
    return RawRows(str(path), rows, numbers, "line", _columns(rows), bad)


def _parse_line(line: bytes) -> tuple[Any, str | None]:
    """`(value, None)`, or `(None, ", column C: not valid JSON (why)")`."""
    try:
        return json.loads(line), None
    except json.JSONDecodeError as err:
        return None, f", column {err.colno}: not valid JSON ({err.msg})"
    except UnicodeDecodeError as err:
        return None, f": not valid JSON ({err})"
    except RecursionError:  # json's C decoder recurses per level of nesting
        return None, ": not valid JSON (nested too deeply to read)"


def _json_document_rows(
    data: bytes, path: Path, key: str, bad_lines: BadLines
) -> tuple[list[dict[str, Any]], list[int], list[BadLine]] | None:
    """`(rows, numbers, bad)` of a `.json` file holding one document (None: JSON lines)."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        if isinstance(err, json.JSONDecodeError) and err.msg == "Extra data":
            return None  # more than one document: JSON lines, read line by line
        if not _is_one_document(data):
            return None  # JSON lines with a broken line: reported with its line number
        where, why = "", str(err)
        if isinstance(err, json.JSONDecodeError):
            where, why = f" at line {err.lineno}, column {err.colno}", err.msg
        elif isinstance(err, RecursionError):
            why = "nested too deeply to read"
        raise UserError(f"{key}: '{path}' is not valid JSON{where}: {why}") from None
    if isinstance(doc, dict) and "chosen" not in doc:
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(
                f"{key}: '{path}' holds an object with keys {', '.join(doc)}: expected rows with "
                "chosen/rejected, a list of them, or an object with one list of them"
            )
        doc = lists[0]
    rows, numbers, bad = [], [], []
    for i, item in enumerate(doc if isinstance(doc, list) else [doc], 1):
        if isinstance(item, dict):
            rows.append(item)
            numbers.append(i)
        elif bad_lines == "raise":
            raise UserError(_not_object(f"{key}: '{path}' row {i}", item))
        else:
            bad.append(BadLine(i, NOT_AN_OBJECT, _not_object(f"row {i}", item)))
    return rows, numbers, bad


def _is_one_document(data: bytes) -> bool:
    """A `.json` file that is one (broken) document, not JSON lines: a list, or a first
    line that is not JSON on its own (a pretty-printed object)."""
    text = data.lstrip()
    if text[:1] == b"[":
        return True
    first = text.split(b"\n", 1)[0]
    return _parse_line(first)[1] is not None


def _not_object(where: str, item: Any) -> str:
    return f"{where}: expected a JSON object with chosen/rejected, got {type(item).__name__}"


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)
