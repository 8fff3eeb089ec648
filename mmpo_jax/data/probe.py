"""The capability probe: held-out multiple-choice questions scored by log-likelihood.

Scoring follows LM-evaluation-harness's multiple-choice tasks: each option is a
continuation of the question's context; the model's summed log-probability of
each continuation picks its answer. `acc` takes the option with the highest
log-likelihood, `acc_norm` the highest log-likelihood per character of the
option, which removes the advantage short options have.

Nothing here runs a model: a caller turns items into (context, continuations)
with `plain_request` or `chat_request`, into token ids with `encode_request`,
computes each continuation's log-likelihood with its model, and hands them to
`score_probe`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpo_jax.data.builtin import probe_path
from mmpo_jax.errors import UserError
from mmpo_jax.data.tokenizer_protocol import Tokenizer

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class ProbeItem:
    """One question with its options; `answer` is the index of the right option."""

    id: str
    category: str
    question: str
    options: tuple[str, ...]
    answer: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "question": self.question,
                "options": list(self.options), "answer": self.answer}

    @classmethod
    def from_json(cls, row: Any, where: str) -> ProbeItem:
        """Validate one JSON row; `where` ('file:line') goes into the error message."""
        if not isinstance(row, dict):
            raise UserError(f"{where}: a probe item is a JSON object, got {type(row).__name__}")
        missing = [k for k in ("id", "category", "question", "options", "answer") if k not in row]
        if missing:
            raise UserError(f"{where}: probe item lacks {', '.join(missing)}")
        options = row["options"]
        if (not isinstance(options, list) or len(options) < 2
                or not all(isinstance(o, str) and o for o in options)
                or len(set(options)) != len(options)):
            raise UserError(f"{where}: 'options' must be at least two distinct non-empty strings")
        answer = row["answer"]
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
            raise UserError(f"{where}: 'answer' must be an option index in [0, {len(options)})")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise UserError(f"{where}: 'question' must be a non-empty string")
        return cls(id=str(row["id"]), category=str(row["category"]), question=row["question"],
                   options=tuple(options), answer=answer)


def load_probe(path: str | Path | None = None) -> list[ProbeItem]:
    """The shipped probe (or a JSONL file of the same shape at `path`)."""
    if path is None:
        path = probe_path()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"probe file not found: '{path}'")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        items.append(ProbeItem.from_json(row, f"{path}:{lineno}"))
    if not items:
        raise UserError(f"{path}: no probe items")
    return items


def plain_request(item: ProbeItem) -> tuple[str, list[str]]:
    """Context 'Question: ...\\nAnswer:' and the options as ' option' continuations."""
    return PLAIN_TEMPLATE.format(question=item.question), [" " + o for o in item.options]


def chat_request(item: ProbeItem, tokenizer: Tokenizer,
                 system_prompt: str | None = None) -> tuple[str, list[str]]:
    """The question as a user turn through the tokenizer's chat template (with the
    generation prompt); the options are the assistant's first words."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": item.question})
    context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return context, list(item.options)


def encode_request(tokenizer: Tokenizer, context: str, continuation: str,
                   add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) whose concatenation is how the model reads them.

    Like LM-harness, the continuation is what follows the context's tokens in the
    encoding of the whole text; where a token would straddle the boundary, the
    continuation is encoded on its own instead. A chat context already holds its
    BOS: encode it with `add_special_tokens=False`.
    """
    context_ids = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids):]
    return context_ids, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def option_lengths(item: ProbeItem) -> list[int]:
    """Characters of each option: `acc_norm`'s normaliser (LM-harness uses the same)."""
    return [len(o) for o in item.options]


def choice_correct(loglikelihoods: Sequence[float], lengths: Sequence[int],
                   answer: int) -> tuple[bool, bool]:
    """(acc, acc_norm) of one item: is the top option by log-likelihood, and by
    log-likelihood per character, the right one? Ties go to the first option."""
    if len(loglikelihoods) != len(lengths) or not loglikelihoods:
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {len(lengths)} options")
    if any(n <= 0 for n in lengths):
        raise ValueError("option lengths must be positive")
    best = max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))
    best_norm = max(range(len(lengths)), key=lambda i: (loglikelihoods[i] / lengths[i], -i))
    return best == answer, best_norm == answer


def score_probe(items: Sequence[ProbeItem],
                loglikelihoods: Sequence[Sequence[float]]) -> dict[str, Any]:
    """acc and acc_norm over all items and per category, plus chance (1/options averaged)."""
    if len(items) != len(loglikelihoods):
        raise ValueError(f"{len(loglikelihoods)} results for {len(items)} probe items")
    hits: dict[str, list[tuple[bool, bool]]] = {}
    for item, lls in zip(items, loglikelihoods):
        if any(not math.isfinite(x) for x in lls):
            raise ValueError(f"probe item {item.id}: non-finite log-likelihood")
        hits.setdefault(item.category, []).append(
            choice_correct(lls, option_lengths(item), item.answer))

    def summary(rows: list[tuple[bool, bool]]) -> dict[str, float]:
        n = len(rows)
        return {"acc": sum(a for a, _ in rows) / n, "acc_norm": sum(b for _, b in rows) / n,
                "n": n}

    everything = [row for rows in hits.values() for row in rows]
    return {**summary(everything),
            "chance": sum(1 / len(i.options) for i in items) / len(items),
            "by_category": {c: summary(rows) for c, rows in sorted(hits.items())}}
