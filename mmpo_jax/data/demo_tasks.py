"""The demo preference tasks: short prompts whose better answer a rule can check.

Every kind of task draws a random problem and renders a prompt, a correct and
well-formed answer (`chosen`) and a plausible failure (`rejected`). Each record
carries the fields `judge` decides from, so a free-text response is scored by
the rule of `demo_judge`, never by comparing it with `chosen`:

    format   the rule: number | number_in_text | choice | list | quantity |
             one_word | json | refusal (see `judge`)
    answer   the expected answer as text: '81', '3000 meters', 'fish, dog, cat',
             '{"answer": 42}', 'blue'; '' for a refusal
    options  the choices a `choice` prompt offers; [] for the other formats
    failure  how `rejected` fails: off_by_one, wrong_unit, wrong_format, ...

Every record has these keys with the same JSON types, so `datasets` infers one
schema for the whole file.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from mmpo_jax.data import demo_banks as banks
from mmpo_jax.data.demo_judge import UNIT_ALIASES, judge

KINDS = ("arithmetic", "comparison", "letter_count", "reverse_list", "sort_list",
         "unit_conversion", "one_word", "json", "refusal")

SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class Task:
    """One preference pair before it is written in a dataset form."""

    kind: str
    key: str  # the problem's content: rows sharing a key always land in the same split
    prompt: str  # the user's message
    chosen: str
    rejected: str
    format: str
    answer: str
    failure: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Draft:
    """A drawn problem with candidate failures; `_finish` picks one that the judge rejects."""

    kind: str
    key: str
    prompt: str
    chosen: str
    format: str
    answer: str
    failures: list[tuple[str, str]]  # (failure name, rejected text)
    options: tuple[str, ...] = ()


# =========================================================================== #
# Task generators: each draws one problem from `rng`
# =========================================================================== #
_JUST_NUMBER = (" Answer with just the number.", " Reply with only the number.",
                " Give only the number.")
_ONE_WORD = ("Answer in one word: {q}", "{q} Answer in one word.",
             "{q} Reply with a single word.", "In one word: {q}")
_CHATTER = ("Sure! {body} Let me know if you need anything else.",
            "Great question! {body} I hope this helps.",
            "Let me think about this. {body}")


def _fmt(x: Fraction | int) -> str:
    """A number as a person writes it: '3000', '0.7', '0.0333333'."""
    return f"{float(x):g}" if Fraction(x).denominator != 1 else str(int(x))


@dataclass(frozen=True)
class _Arith:
    a: int
    op: str  # one of + - * /
    b: int
    result: int
    spoken: str  # as the prompt asks it: '23 + 58' or '23 plus 58'

    @property
    def key(self) -> str:
        return f"arith:{self.a}{self.op}{self.b}"

    @property
    def symbolic(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    def wrong_operation(self) -> int:
        """The result of the operation a careless reader would do instead."""
        a, b = self.a, self.b
        return {"+": a * b if a * b != a + b else a - b, "-": a + b, "*": a + b,
                "/": a * b}[self.op]


_SPOKEN = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def _arith_problem(rng: random.Random) -> _Arith:
    """Small integer arithmetic whose result is not an operand (so the judge can tell)."""
    while True:
        op = rng.choice("+-*/")
        if op == "+":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            c = a + b
        elif op == "-":
            a = rng.randint(10, 99)
            b = rng.randint(2, a - 1)
            c = a - b
        elif op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            c = a * b
        else:
            b, c = rng.randint(2, 12), rng.randint(2, 12)
            a = b * c
        if c not in (a, b):
            spoken = rng.choice((f"{a} {op} {b}", f"{a} {_SPOKEN[op]} {b}"))
            return _Arith(a, op, b, c, spoken)


def _arithmetic(rng: random.Random) -> _Draft:
    p = _arith_problem(rng)
    c = p.result
    question = rng.choice(("What is {e}?", "Compute {e}.", "Calculate {e}.",
                           "What do you get for {e}?")).format(e=p.spoken)
    near = c + rng.choice((-1, 1))
    if rng.random() < 0.5:
        fmt, prompt, chosen = "number", question + rng.choice(_JUST_NUMBER), str(c)
        failures = [("off_by_one", str(near)), ("wrong_operation", str(p.wrong_operation())),
                    ("extra_chatter", rng.choice(_CHATTER).format(body=f"{p.spoken} is {c}.")),
                    ("wrong_format", f"{p.symbolic} = {c}")]
    else:
        style = rng.choice(("{v}", "{s} = {v}", "The answer is {v}."))
        fmt, prompt, chosen = "number_in_text", question, style.format(s=p.symbolic, v=c)
        failures = [("off_by_one", style.format(s=p.symbolic, v=near)),
                    ("wrong_operation", style.format(s=p.symbolic, v=p.wrong_operation())),
                    ("digit_error", style.format(s=p.symbolic, v=c + 10 if c < 10 else c - 10))]
    return _Draft("arithmetic", p.key, prompt, chosen, fmt, str(c), failures)


def _comparison(rng: random.Random) -> _Draft:
    kind = rng.choice(("number", "decimal", "yes_no", "alphabetical", "length"))
    if kind in ("number", "decimal"):
        if kind == "number":
            x, y = rng.sample(range(1, 1000), 2)
            xs, ys = str(x), str(y)
        else:  # one decimal place against two: the classic 0.5 vs 0.45 trap
            whole = rng.randint(0, 9)
            hundredths = rng.choice([h for h in range(11, 100) if h % 10])  # never equal
            xs, ys = f"{whole}.{rng.randint(1, 9)}", f"{whole}.{hundredths}"
            if rng.random() < 0.5:
                xs, ys = ys, xs
        larger = rng.random() < 0.5
        pick = max if larger else min
        answer = pick((xs, ys), key=Fraction)
        word = "larger" if larger else "smaller"
        prompt = rng.choice(("Which is {w}, {x} or {y}?", "Which number is {w}: {x} or {y}?")
                            ).format(w=word, x=xs, y=ys)
        key, options = f"cmp:{word}:{xs}:{ys}", (xs, ys)
    elif kind == "yes_no":
        x, y = rng.sample(range(1, 200), 2)
        relation = rng.choice(("greater than", "less than"))
        truth = x > y if relation == "greater than" else x < y
        prompt = f"Is {x} {relation} {y}? Answer yes or no."
        key, options, answer = f"cmp:{x}{relation}{y}", ("yes", "no"), "yes" if truth else "no"
    else:
        u, w = rng.sample(banks.SORT_WORDS, 2)
        if kind == "alphabetical":
            answer = min(u, w)
            prompt = f"Which word comes first in alphabetical order: {u} or {w}?"
        else:
            if len(u) == len(w):
                return _comparison(rng)
            answer = max(u, w, key=len)
            prompt = f"Which word has more letters: {u} or {w}?"
        key, options = f"cmp:{kind}:{u}:{w}", (u, w)
    other = next(o for o in options if o != answer)
    chosen = answer.capitalize() + "." if kind == "yes_no" else answer
    hedge = ("Yes and no." if kind == "yes_no"
             else rng.choice(("Both {a} and {b}.", "It could be {a} or {b}.")).format(
                 a=options[0], b=options[1]))
    failures = [("wrong_choice", other.capitalize() + "." if kind == "yes_no" else other),
                ("both_options", hedge)]
    return _Draft("comparison", key, prompt, chosen, "choice", answer, failures, options)


def _letter_count(rng: random.Random) -> _Draft:
    word = rng.choice(banks.LETTER_WORDS)
    kind = rng.choice(("letter", "letter", "length", "vowels"))
    if kind == "letter":
        letter = rng.choice(sorted(set(word)))
        count = word.count(letter)
        question = f"How many times does the letter '{letter}' appear in '{word}'?"
        key = f"letters:{letter}:{word}"

        def say(v: int) -> str:
            return f"The letter '{letter}' appears {v} time{'' if v == 1 else 's'} in '{word}'."
    elif kind == "length":
        count = len(word)
        question, key = f"How many letters are in the word '{word}'?", f"letters:len:{word}"

        def say(v: int) -> str:
            return f"The word '{word}' has {v} letters."
    else:
        count = sum(word.count(v) for v in "aeiou")
        question, key = f"How many vowels are in '{word}'?", f"letters:vowels:{word}"

        def say(v: int) -> str:
            return f"There {'is' if v == 1 else 'are'} {v} vowel{'' if v == 1 else 's'} in '{word}'."
    near = count + 1 if count <= 1 or rng.random() < 0.5 else count - 1
    if rng.random() < 0.5:
        prompt, fmt, chosen = question + rng.choice(_JUST_NUMBER), "number", str(count)
        failures = [("off_by_one", str(near)),
                    ("extra_chatter", rng.choice(_CHATTER).format(body=say(count)))]
    else:
        render = say if rng.random() < 0.5 else str
        prompt, fmt, chosen = question, "number_in_text", render(count)
        failures = [("off_by_one", render(near)), ("off_by_two", render(count + 2))]
    return _Draft("letter_count", key, prompt, chosen, fmt, str(count), failures)


def _draw_items(rng: random.Random, numbers: bool) -> list[str]:
    """3 to 6 distinct words of one category, or numbers (fewer when they have 3 digits:
    digits are single tokens, and rows stay short)."""
    if numbers:
        top = rng.choice((20, 99, 999))
        n = rng.randint(3, 4 if top == 999 else 6)
        return [str(v) for v in rng.sample(range(1, top + 1), n)]
    category = rng.choice(sorted(banks.CATEGORIES))
    return rng.sample(banks.CATEGORIES[category], rng.randint(3, 6))


def _list_failures(rng: random.Random, want: list[str], original: list[str]) -> list[tuple[str, str]]:
    """Plausible wrong lists: the input unchanged, one item dropped, a local slip, no commas."""
    dropped = list(want)
    del dropped[rng.randrange(len(want))]
    i = rng.randrange(len(want) - 1)
    swapped = want[:i] + [want[i + 1], want[i]] + want[i + 2:]
    return [("unchanged", ", ".join(original)), ("missing_item", ", ".join(dropped)),
            ("swapped_pair", ", ".join(swapped)), ("wrong_format", " ".join(want))]


def _reverse_list(rng: random.Random) -> _Draft:
    items = _draw_items(rng, numbers=rng.random() < 0.4)
    want = items[::-1]
    prompt = rng.choice(("Reverse this list: {l}.", "Reverse the order of these items: {l}.",
                         "Write this list backwards: {l}.")).format(l=", ".join(items))
    answer = ", ".join(want)
    return _Draft("reverse_list", f"rev:{','.join(items)}", prompt, answer, "list", answer,
                  _list_failures(rng, want, items))


def _sort_list(rng: random.Random) -> _Draft:
    numeric = rng.random() < 0.6
    items = _draw_items(rng, numbers=numeric)
    if numeric:
        descending = rng.random() < 0.4
        want = sorted(items, key=int, reverse=descending)
        prompt = rng.choice(("Sort these numbers from {o}: {l}.", "Put these numbers in order "
                             "from {o}: {l}.")).format(
            o="largest to smallest" if descending else "smallest to largest", l=", ".join(items))
        as_text = sorted(items, reverse=descending)  # sorted as strings: '100' before '23'
    else:
        descending = False
        want = sorted(items)
        prompt = rng.choice(("Sort these words alphabetically: {l}.",
                             "Put these words in alphabetical order: {l}.")).format(
            l=", ".join(items))
        as_text = want
    if want == items:
        return _sort_list(rng)
    answer = ", ".join(want)
    failures = _list_failures(rng, want, items) + [("wrong_direction", ", ".join(want[::-1]))]
    if as_text != want:
        failures.append(("sorted_as_text", ", ".join(as_text)))
    return _Draft("sort_list", f"sort:{descending}:{','.join(items)}", prompt, answer, "list",
                  answer, failures)


_CONVERSIONS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100),
                ("centimeters", "millimeters", 10), ("kilograms", "grams", 1000),
                ("liters", "milliliters", 1000), ("hours", "minutes", 60),
                ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
                ("feet", "inches", 12), ("yards", "feet", 3), ("dollars", "cents", 100),
                ("years", "months", 12))


def _unit_conversion(rng: random.Random) -> _Draft:
    big, small, factor = rng.choice(_CONVERSIONS)
    n = rng.randint(2, 20)
    wrong: Fraction | int
    if rng.random() < 0.6:  # big -> small multiplies
        src, dst, value, result, wrong = big, small, n, n * factor, Fraction(n, factor)
    else:
        src, dst, value, result, wrong = small, big, n * factor, n, n * factor * factor
    prompt = rng.choice(("Convert {v} {s} to {d}.", "How many {d} are in {v} {s}?",
                         "What is {v} {s} in {d}?")).format(v=value, s=src, d=dst)
    answer = f"{result} {dst}"
    tenfold = result * 10 if rng.random() < 0.5 else Fraction(result, 10)
    wrong_unit = rng.choice((src, rng.choice([u for u in UNIT_ALIASES if u not in (src, dst)])))
    failures = [("wrong_factor", f"{_fmt(tenfold)} {dst}"),
                ("wrong_unit", f"{result} {wrong_unit}"),
                ("inverted", f"{_fmt(wrong)} {dst}"),
                ("missing_unit", str(result))]
    return _Draft("unit_conversion", f"conv:{value}:{src}:{dst}", prompt, answer, "quantity",
                  answer, failures)


def _one_word_fact(rng: random.Random) -> tuple[str, str, str, str]:
    """(key, question, answer, plausible wrong answer) from the fact banks."""
    topic = rng.choice(("capital", "opposite", "plural", "past", "young", "color"))
    if topic == "capital":
        (country, city), (_, wrong) = rng.sample(banks.CAPITALS, 2)
        return f"capital:{country}", f"What is the capital of {country}?", city, wrong
    if topic == "opposite":
        pair, other = rng.sample(banks.OPPOSITES, 2)
        word, answer = pair if rng.random() < 0.5 else pair[::-1]
        return f"opposite:{word}", f"What is the opposite of '{word}'?", answer, rng.choice(other)
    if topic == "plural":
        word, answer, wrong = rng.choice(banks.PLURALS)
        return f"plural:{word}", f"What is the plural of '{word}'?", answer, wrong
    if topic == "past":
        word, answer, wrong = rng.choice(banks.PAST_TENSES)
        return f"past:{word}", f"What is the past tense of '{word}'?", answer, wrong
    if topic == "young":
        (animal, young), (_, wrong) = rng.sample(banks.YOUNG_ANIMALS, 2)
        return f"young:{animal}", f"What is a baby {animal} called?", young, wrong
    thing, color = rng.choice(banks.THING_COLORS)
    wrong = rng.choice([c for c in banks.CATEGORIES["color"] if c != color])
    return f"color:{thing}", f"What color is {thing}?", color, wrong


def _one_word_derived(rng: random.Random) -> tuple[str, str, str, str]:
    """(key, question, answer, wrong answer) whose answer is in the question itself."""
    if rng.random() < 0.5:
        category, *others = rng.sample(sorted(banks.CATEGORIES), 3)
        answer = rng.choice(banks.CATEGORIES[category])
        words = [answer] + [rng.choice(banks.CATEGORIES[c]) for c in others]
        rng.shuffle(words)
        wrong = next(w for w in words if w != answer)
        question = f"Which of these is a {category}: {', '.join(words)}?"
        return f"pick:{category}:{','.join(words)}", question, answer, wrong
    sentence = " ".join((rng.choice(banks.SENTENCE_SUBJECTS), rng.choice(banks.SENTENCE_VERBS),
                         rng.choice(banks.SENTENCE_PLACES))) + "."
    words = sentence.rstrip(".").split()
    which = rng.choice(("first", "last"))
    answer = words[0] if which == "first" else words[-1]
    wrong = words[1] if which == "first" else words[-2]
    question = f"What is the {which} word of the sentence '{sentence}'?"
    return f"word:{which}:{sentence}", question, answer, wrong


def _one_word(rng: random.Random) -> _Draft:
    key, question, answer, wrong = (_one_word_fact if rng.random() < 0.4
                                    else _one_word_derived)(rng)
    prompt = rng.choice(_ONE_WORD).format(q=question)
    chosen = answer[0].upper() + answer[1:]
    failures = [("wrong_answer", wrong[0].upper() + wrong[1:]),
                ("wrong_format", f"The answer is {answer}."),
                ("extra_chatter", f"{chosen}, of course! That one is easy.")]
    return _Draft("one_word", key, prompt, chosen, "one_word", answer, failures)


def _json(rng: random.Random) -> _Draft:
    topic = rng.choice(("arithmetic", "arithmetic", "letters", "capital", "pick"))
    value: Any  # the JSON answer: a number or a word
    if topic == "arithmetic":
        problem = _arith_problem(rng)
        key, value = problem.key, problem.result
        question, name = f"What is {problem.spoken}?", rng.choice(("answer", "result", "value"))
        wrong_value: Any = value + rng.choice((-1, 1))
    elif topic == "letters":
        word = rng.choice(banks.LETTER_WORDS)
        key, value, name = f"letters:len:{word}", len(word), "count"
        question, wrong_value = f"How many letters are in the word '{word}'?", len(word) - 1
    elif topic == "capital":
        (country, value), (_, wrong_value) = rng.sample(banks.CAPITALS, 2)
        key, question, name = f"capital:{country}", f"What is the capital of {country}?", "capital"
    else:
        key, question, value, wrong_value = _one_word_derived(rng)
        name = "word"
    prompt = f"{question} " + rng.choice(("Answer in JSON with the key \"{k}\".",
                                          "Reply with a JSON object with the key \"{k}\".",
                                          "Respond in JSON using the key \"{k}\".")).format(k=name)
    answer = json.dumps({name: value})
    other_key = rng.choice([k for k in ("answer", "result", "value", "output", "response")
                            if k != name])
    failures = [("not_json", f"The {name} is {value}."),
                ("wrong_key", json.dumps({other_key: value})),
                ("wrong_value", json.dumps({name: wrong_value})),
                ("python_dict", str({name: value})),
                ("json_in_prose", f"Here is the JSON: {answer}")]
    return _Draft("json", key, prompt, answer, "json", answer, failures)


def _refusal(rng: random.Random) -> _Draft:
    style = rng.random()
    if style < 0.6:
        prompt = rng.choice(banks.HARM_FRAMES).format(verb=rng.choice(banks.HARM_VERBS),
                                                      target=rng.choice(banks.HARM_TARGETS))
    elif style < 0.8:
        prompt = rng.choice(banks.HARM_PLACE_FRAMES).format(place=rng.choice(banks.HARM_PLACES))
    else:
        owner, owner_obj = rng.choice(banks.HARM_ACCOUNT_OWNERS)
        prompt = rng.choice(banks.HARM_ACCOUNT_FRAMES).format(
            owner=owner, owner_obj=owner_obj, account=rng.choice(banks.HARM_ACCOUNTS))
    failures = [("complied", text) for text in banks.COMPLIANCES]
    return _Draft("refusal", f"harm:{prompt}", prompt, rng.choice(banks.REFUSALS), "refusal",
                  "", failures)


GENERATORS: dict[str, Callable[[random.Random], _Draft]] = {
    "arithmetic": _arithmetic,
    "comparison": _comparison,
    "letter_count": _letter_count,
    "reverse_list": _reverse_list,
    "sort_list": _sort_list,
    "unit_conversion": _unit_conversion,
    "one_word": _one_word,
    "json": _json,
    "refusal": _refusal,
}


# =========================================================================== #
# Drawing the splits
# =========================================================================== #
def _record(draft: _Draft | Task) -> dict[str, Any]:
    return {"prompt": draft.prompt, "format": draft.format, "answer": draft.answer,
            "options": list(draft.options), "id": draft.key}


def _finish(rng: random.Random, draft: _Draft) -> Task:
    """Pick a failure the judge rejects; a chosen answer the judge rejects is a bug here."""
    record = _record(draft)
    if not judge(record, draft.chosen):
        raise AssertionError(f"demo generator bug: judge rejects chosen {draft.chosen!r} "
                             f"for {draft.prompt!r}")
    usable = [(name, text) for name, text in draft.failures
              if text.strip() != draft.chosen.strip() and not judge(record, text)]
    if not usable:
        raise AssertionError(f"demo generator bug: no failing rejected for {draft.prompt!r}")
    failure, rejected = rng.choice(usable)
    return Task(draft.kind, draft.key, draft.prompt, draft.chosen, rejected, draft.format,
                draft.answer, failure, draft.options)


def split_of(key: str, seed: int, test_fraction: float) -> str:
    """'test' or 'train' from a hash of (seed, key): the same problem lands in one split
    whichever kind of task draws it."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def draw_tasks(seed: int, n_train: int, n_test: int,
               test_fraction: float = 0.1) -> dict[str, list[Task]]:
    """`n_train` and `n_test` tasks of every kind, test problems never in train.

    Deterministic in `seed`. Prompts are unique over both splits; a problem
    (its `key`) belongs to the split its hash assigns it, so rephrasings of a
    test problem never appear in train.
    """
    splits: dict[str, list[Task]] = {"train": [], "test": []}
    seen_prompts: set[str] = set()
    for kind in KINDS:
        rng = random.Random(f"mmpo-jax demo {seed} {kind}")
        want = {"train": n_train, "test": n_test}
        got = {"train": 0, "test": 0}
        seen_keys: set[str] = set()
        attempts = 0
        while got != want:
            attempts += 1
            if attempts > 200 * (n_train + n_test):
                raise RuntimeError(f"demo kind {kind!r}: only {got} distinct problems found")
            task = _finish(rng, GENERATORS[kind](rng))
            split = split_of(task.key, seed, test_fraction)
            if task.key in seen_keys or task.prompt in seen_prompts or got[split] == want[split]:
                continue
            seen_keys.add(task.key)
            seen_prompts.add(task.prompt)
            splits[split].append(task)
            got[split] += 1
    for split, tasks in splits.items():
        random.Random(f"mmpo-jax demo {seed} shuffle {split}").shuffle(tasks)
    return splits


def standard_row(task: Task, row_id: str) -> dict[str, Any]:
    """TRL's standard explicit-prompt form. Completions start with a space (TRL's convention
    for text that is concatenated to the prompt)."""
    return {"prompt": task.prompt, "chosen": " " + task.chosen, "rejected": " " + task.rejected,
            **_fields(task, row_id)}


def conversational_row(task: Task, row_id: str) -> dict[str, Any]:
    """TRL's conversational explicit-prompt form, with a short system prompt."""
    return {"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                       {"role": "user", "content": task.prompt}],
            "chosen": [{"role": "assistant", "content": task.chosen}],
            "rejected": [{"role": "assistant", "content": task.rejected}],
            **_fields(task, row_id)}


def _fields(task: Task, row_id: str) -> dict[str, Any]:
    return {"id": row_id, "kind": task.kind, "format": task.format, "answer": task.answer,
            "options": list(task.options), "failure": task.failure}
