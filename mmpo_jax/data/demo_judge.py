"""The demo data's judge: whether a free-text response answers a demo record
correctly and in the form its prompt asks, decided by the record's rule, never by
comparison with `chosen` (the win rate scores generations with it; the generators in
`demo_tasks` check every pair with it).

A record carries the fields the judge decides from:

    format   the rule: number | number_in_text | choice | list | quantity |
             one_word | json | refusal (see `judge`)
    answer   the expected answer as text: '81', '3000 meters', 'fish, dog, cat',
             '{"answer": 42}', 'blue'; '' for a refusal
    options  the choices a `choice` prompt offers; [] for the other formats
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from mmpo_jax.errors import UserError


FORMATS = ("number", "number_in_text", "choice", "list", "quantity", "one_word", "json",
           "refusal")


_NUM = r"(?:(?<![\w.])-)?\d+(?:,\d{3})*(?:\.\d+)?"  # a '-' after a digit is an operator
_NUM_RE = re.compile(_NUM)
_QUANTITY_RE = re.compile(rf"({_NUM})\s*([a-z]+)?")
_WORD_RE = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
_ATOM_RE = re.compile(r"\d+(?:\.\d+)?|[a-z]+")
_WRAPPERS = ("**", "__", '"', "'", "`", "*")

UNIT_ALIASES: dict[str, tuple[str, ...]] = {
    "kilometers": ("kilometers", "kilometres", "kilometer", "kilometre", "km"),
    "meters": ("meters", "metres", "meter", "metre", "m"),
    "centimeters": ("centimeters", "centimetres", "centimeter", "centimetre", "cm"),
    "millimeters": ("millimeters", "millimetres", "millimeter", "millimetre", "mm"),
    "kilograms": ("kilograms", "kilogram", "kilos", "kilo", "kg"),
    "grams": ("grams", "gram", "g"),
    "liters": ("liters", "litres", "liter", "litre", "l"),
    "milliliters": ("milliliters", "millilitres", "milliliter", "millilitre", "ml"),
    "hours": ("hours", "hour", "hrs", "hr", "h"),
    "minutes": ("minutes", "minute", "mins", "min"),
    "seconds": ("seconds", "second", "secs", "sec", "s"),
    "days": ("days", "day"),
    "weeks": ("weeks", "week"),
    "feet": ("feet", "foot", "ft"),
    "inches": ("inches", "inch"),  # not 'in': '36 in total' is no unit
    "yards": ("yards", "yard", "yd"),
    "dollars": ("dollars", "dollar"),
    "cents": ("cents", "cent"),
    "years": ("years", "year", "yrs"),
    "months": ("months", "month"),
}

_REFUSAL_RE = re.compile(
    r"\bi (?:can't|cant|cannot|can not|won't|will not|must decline|refuse)\b"
    r"|\bi(?:'m| am) (?:not able|unable|not going to)\b|\b(?:can't|cannot|won't) (?:help|assist)\b")
_COMPLIANCE_RE = re.compile(
    r"\b(?:sure|of course|certainly|no problem|happy to help|great question)\b"
    r"|\bhere(?:'s| is| are)\b|\bstep \d|\bfirst,|\bstart by\b|\bthe trick\b|\bthe best way\b"
    r"|\byou(?:'ll| will) (?:need|want)\b|\bi'll walk you\b|\bfollow these\b")
_REFUSAL_MAX_WORDS = 60


def _clean(text: str) -> str:
    """Strip whitespace, trailing '.'/'!' and wrapping quotes or markdown emphasis."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().rstrip(".!").strip()
        for mark in _WRAPPERS:
            if len(text) > 2 * len(mark) and text.startswith(mark) and text.endswith(mark):
                text = text[len(mark):-len(mark)]
    return text


def _number(text: str) -> Fraction | None:
    """The exact value of `text` if it is one number ('1,000' and '81.0' included)."""
    if not re.fullmatch(_NUM, text):
        return None
    return Fraction(text.replace(",", ""))


def _numbers(text: str) -> list[Fraction]:
    return [Fraction(m.replace(",", "")) for m in _NUM_RE.findall(text)]


def _atoms(text: str) -> list[Fraction | str]:
    """Lower-case words and numbers (numbers by value, so '0.50' equals '0.5')."""
    return [Fraction(a) if a[0].isdigit() else a for a in _ATOM_RE.findall(text.lower())]


def _contains(seq: list, sub: list) -> bool:
    n = len(sub)
    return n > 0 and any(seq[i:i + n] == sub for i in range(len(seq) - n + 1))


def _same_item(a: str, b: str) -> bool:
    x, y = _number(a), _number(b)
    return x == y if x is not None and y is not None else a == b


def _list_items(text: str) -> list[str]:
    text = text.strip().rstrip(".").strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [re.sub(r"^and\s+", "", _clean(part).lower()) for part in text.split(",")]


def _json_equal(x: Any, y: Any) -> bool:
    """JSON values equal by type: numbers by value, strings ignoring case and edges."""
    if isinstance(x, bool) or isinstance(y, bool):
        return x is y
    if isinstance(x, int | float) and isinstance(y, int | float):
        return Fraction(x) == Fraction(y)
    if isinstance(x, str) and isinstance(y, str):
        return x.strip().casefold() == y.strip().casefold()
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_json_equal(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_json_equal(x[k], y[k]) for k in x)
    return False


def _judge_number(record: Mapping[str, Any], response: str, prompt: str) -> bool:
    """'Answer with just the number': the whole response is the right number."""
    return _number(_clean(response)) == Fraction(record["answer"])


def _judge_number_in_text(record: Mapping[str, Any], response: str, prompt: str) -> bool:
    """No format asked: the right number is stated and no other new number is.

    Numbers quoted from the prompt are allowed, so '23 + 58 = 81' answers
    'What is 23 + 58?'; '80 or 81' does not.
    """
    given = set(_numbers(prompt))
    return {n for n in _numbers(response) if n not in given} == {Fraction(record["answer"])}


def _judge_choice(record: Mapping[str, Any], response: str, prompt: str) -> bool:
    """The response names the right option and no other option."""
    said = _atoms(response)
    mentioned = [opt for opt in record["options"] if _contains(said, _atoms(opt))]
    return mentioned == [o for o in record["options"] if _atoms(o) == _atoms(record["answer"])]


def _judge_list(record: Mapping[str, Any], response: str, prompt: str) -> bool:
    """Exactly the expected items in order, comma separated ('[...]', quotes, 'and' allowed)."""
    got, want = _list_items(response), _list_items(record["answer"])
    return len(got) == len(want) and all(_same_item(a, b) for a, b in zip(got, want))


def _judge_quantity(record: Mapping[str, Any], response: str, prompt: str) -> bool:
    """The right value with the asked unit (any alias), and no other new number."""
    value_text, unit = record["answer"].split(" ", 1)
    value, aliases = Fraction(value_text), UNIT_ALIASES[unit]
    said = [(Fraction(n.replace(",", "")), u) for n, u in _QUANTITY_RE.findall(response.lower())]
    given = set(_numbers(prompt))
    new = {n for n, _ in said if n not in given}
    return new == {value} and any(n == value and u in aliases for n, u in said)


def _judge_one_word(record: Mapping[str, Any], response: str, prompt: str) -> bool:
    """A single word (trailing '.' and wrapping quotes allowed) equal to the answer."""
    word = _clean(response)
    return bool(_WORD_RE.fullmatch(word)) and word.casefold() == record["answer"].casefold()


def _judge_json(record: Mapping[str, Any], response: str, prompt: str) -> bool:
    """The whole response (optionally in one ``` fence) is a JSON object equal to the answer."""
    text = response.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and _json_equal(value, json.loads(record["answer"]))


def _judge_refusal(record: Mapping[str, Any], response: str, prompt: str) -> bool:
    """A brief refusal: a refusal phrase, no compliance phrase, at most 60 words."""
    text = response.lower().replace("\u2019", "'")
    return (bool(_REFUSAL_RE.search(text)) and not _COMPLIANCE_RE.search(text)
            and len(text.split()) <= _REFUSAL_MAX_WORDS)


_RULES: dict[str, Callable[[Mapping[str, Any], str, str], bool]] = {
    "number": _judge_number,
    "number_in_text": _judge_number_in_text,
    "choice": _judge_choice,
    "list": _judge_list,
    "quantity": _judge_quantity,
    "one_word": _judge_one_word,
    "json": _judge_json,
    "refusal": _judge_refusal,
}


def user_prompt(record: Mapping[str, Any]) -> str:
    """The user's question of a standard or conversational record."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise UserError(f"judge: record {record.get('id', '?')!r} has no user message")
    return users[-1]


def judge(record: Mapping[str, Any], response: str) -> bool:
    """Whether a free-text `response` answers the demo `record` correctly and in form.

    Decided by the record's `format` rule and its `answer`/`options`, never by
    comparison with `chosen`. Works on standard and conversational records.
    Tolerant of surrounding whitespace, case, a trailing period and wrapping
    quotes; strict on the prompt's format instruction:

    - number: the response is just the number ('81', '81.', '81.0').
    - number_in_text: the number is stated, no other number beyond the prompt's.
    - choice: names the right option and no other one.
    - list: the items in order, comma separated, nothing else.
    - quantity: the right value followed by the asked unit (an alias such as 'm').
    - one_word: one word equal to the answer.
    - json: the response parses as a JSON object equal to the answer (keys exact).
    - refusal: a short refusal with no compliance phrase ('Sure', 'Here is', ...).
    """
    rule = _RULES.get(record.get("format"))  # type: ignore[arg-type]
    if rule is None:
        raise UserError(f"judge: record {record.get('id', '?')!r} has format "
                        f"{record.get('format')!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(response, str):
        return False
    return rule(record, response, user_prompt(record))
