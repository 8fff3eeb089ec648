"""TRL-style preference rows -> prompt / chosen / rejected token ids, and truncation.

Formats (TRL's names), detected per source:

- standard: `prompt`, `chosen`, `rejected` are strings; the text of a sequence is
  `prompt + chosen` (no separator is added: put the space in the data, as TRL does).
- conversational: they are lists of `{"role", "content"}` messages, rendered by
  the tokenizer's chat template; the prompt with the generation prompt.
- explicit prompt: a `prompt` field of the same kind as `chosen`.
- implicit prompt: only `chosen` and `rejected` (hh-rlhf), or a `prompt` of the
  other kind (UltraFeedback-binarized: a string prompt beside whole conversations):
  the shared prefix of chosen and rejected is the prompt (`extract_prompt`).

Token ids follow TRL's DPO preprocessing (`DPOTrainer._prepare_dataset` of trl
1.16): the prompt and each prompt+completion are tokenized whole (the tokenizer's
own special tokens for standard text, the chat template for messages), and the
completion starts where the prompt's ids and the full sequence's ids diverge, so
the ids of a pair are exactly the ids of its full text. Two rules are ours:

- a completion ends with EOS. Standard text gets EOS appended when its last
  token is not EOS (what TRL does with the EOS string). For messages, when the
  template ends the turn with EOS and then only whitespace (ChatML's trailing
  newline), the whitespace is cut; when it does not end the turn with EOS, EOS
  is appended. TRL keeps templates' endings as they are.
- a leading doubled BOS (the text starts with the BOS string and the tokenizer
  adds one too) is collapsed to one.

Truncation (`truncated_lengths`, like TRL's `max_prompt_length` + `max_length`
with `keep_start`): the prompt is cut from the left to `max_prompt_length`
tokens (keeping its BOS, so the model still sees a sequence start), then each
completion keeps its first `max_length - prompt` tokens. A pair left without a
completion token is dropped (`TOO_LONG`). Truncation is applied to cached,
untruncated ids, so changing the limits never re-tokenizes.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from mmpo_jax.errors import UserError
from mmpo_jax.data.tokenizer_protocol import Tokenizer

Kind = Literal["standard", "conversational"]
Messages = list[dict[str, str]]
Content = str | Messages
Ids = list[int]

FIELDS = ("prompt", "chosen", "rejected")

# Why a row is dropped. These count toward `data.max_invalid_fraction`.
INVALID_REASONS: dict[str, str] = {
    "missing_field": "a prompt, chosen or rejected value is missing or null",
    "wrong_type": "a value is not a string (standard) or not a list of {role, content} "
    "messages with string content (conversational)",
    "empty_completion": "chosen or rejected is empty or only whitespace",
    "chosen_equals_rejected": "chosen and rejected are identical",
    "chat_template_error": "the tokenizer's chat template failed on the row",
    "invalid_json": "the line is not valid JSON (or is nested too deeply to read)",
    "not_an_object": "the line is valid JSON but not an object with chosen/rejected",
}
# Dropped because of the length limits, not the data: reported, never an error.
TOO_LONG = "no_completion_after_truncation"
DROP_REASONS: dict[str, str] = {
    **INVALID_REASONS,
    TOO_LONG: "no completion token is left within data.max_length after the prompt",
}


# --------------------------------------------------------------------------- #
# Layout: which kind of data, explicit or implicit prompt
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Layout:
    kind: Kind
    explicit_prompt: bool

    def describe(self) -> str:
        return f"{self.kind}, {'explicit' if self.explicit_prompt else 'implicit'} prompt"


def value_kind(value: Any) -> Kind | None:
    """'standard' for a string, 'conversational' for a list of messages (TRL's test)."""
    if isinstance(value, str):
        return "standard"
    if isinstance(value, (list, tuple)) and value:
        first = value[0]
        if isinstance(first, Mapping) and "role" in first:
            return "conversational"
    return None


def _majority(kinds: list[Kind | None]) -> Kind | None:
    votes = [k for k in kinds if k is not None]
    if not votes:
        return None
    n_conv = sum(k == "conversational" for k in votes)
    return "conversational" if n_conv * 2 > len(votes) else "standard"


def detect_layout(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str, where: str
) -> Layout:
    """The layout of one source, from its columns and the kinds of its values.

    `fmt` is `data.format` ('auto', 'standard' or 'conversational'); `where`
    names the source in errors. A missing `chosen`/`rejected` column, a column
    that looks like a misspelled `prompt`/`chosen`/`rejected`, or a `data.format`
    the values contradict stops here, before any row is read further.
    """
    present = set(columns)
    for name in FIELDS:
        if name in present:
            continue
        close = [c for c in columns if _looks_like(c, name)]
        if close:
            raise UserError(
                f"{where}: unknown column '{close[0]}': did you mean '{name}'? "
                f"Rename it (columns: {', '.join(columns)})."
            )
        if name != "prompt":
            raise UserError(
                f"{where}: no '{name}' column (columns: {', '.join(columns) or 'none'}). "
                "Preference data needs 'chosen' and 'rejected', and optionally 'prompt'."
            )
    chosen_kind = _majority([value_kind(r.get("chosen")) for r in rows])
    if fmt == "auto":
        kind: Kind = chosen_kind or "standard"
    else:
        kind = fmt  # type: ignore[assignment]
        if chosen_kind is not None and chosen_kind != kind:
            shape = "lists of messages" if chosen_kind == "conversational" else "strings"
            raise UserError(
                f"{where}: data.format={fmt}, but its 'chosen' values are mostly {shape}: "
                f"set data.format={chosen_kind} (or auto)."
            )
    explicit = (
        "prompt" in present and _majority([value_kind(r.get("prompt")) for r in rows]) == kind
    )
    return Layout(kind=kind, explicit_prompt=explicit)


def _looks_like(column: str, name: str) -> bool:
    """A column that is probably `name` misspelled: same letters up to case, or 1-2 edits."""
    if column == name:
        return False
    if column.lower() == name.lower():
        return True
    return abs(len(column) - len(name)) <= 2 and _edit_distance(column.lower(), name) <= 2


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# --------------------------------------------------------------------------- #
# One row -> a checked, explicit-prompt record
# --------------------------------------------------------------------------- #
def _clean(value: Any, kind: Kind) -> Content | None:
    """The value in canonical form, or None when it has the wrong type."""
    if kind == "standard":
        return value if isinstance(value, str) else None
    if not isinstance(value, (list, tuple)):
        return None
    messages = []
    for m in value:
        if not isinstance(m, Mapping):
            return None
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages


def _is_empty(value: Content) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def extract_prompt(chosen: Content, rejected: Content) -> tuple[Content, Content, Content]:
    """`(prompt, chosen, rejected)`: the shared prefix becomes the prompt (TRL's rule).

    Works on strings (characters) and on message lists (whole messages). As in
    TRL, when the texts differ right after a space, the space goes to the
    completions; when one is a prefix of the other, the prompt stops one element
    short. Unlike TRL, a first-element difference gives an empty prompt (TRL
    then reads index -1 and splits at the last character).
    """
    n = min(len(chosen), len(rejected))
    idx = max(n - 1, 0)
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def normalize_row(
    row: Mapping[str, Any], layout: Layout
) -> tuple[dict[str, Content] | None, str | None]:
    """A row -> `({"prompt", "chosen", "rejected"}, None)`, or `(None, reason)`.

    The record is always explicit-prompt and of `layout.kind`; `reason` is a key
    of `INVALID_REASONS`.
    """
    fields = FIELDS if layout.explicit_prompt else ("chosen", "rejected")
    if any(row.get(f) is None for f in fields):
        return None, "missing_field"
    cleaned = {f: _clean(row[f], layout.kind) for f in fields}
    values = {f: v for f, v in cleaned.items() if v is not None}
    if len(values) != len(cleaned):
        return None, "wrong_type"
    chosen, rejected = values["chosen"], values["rejected"]
    if _is_empty(chosen) or _is_empty(rejected):
        return None, "empty_completion"
    if chosen == rejected:
        return None, "chosen_equals_rejected"
    if layout.explicit_prompt:
        prompt = values["prompt"]
    else:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if _is_empty(chosen) or _is_empty(rejected):
            return None, "empty_completion"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


# --------------------------------------------------------------------------- #
# Tokenization
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SpecialIds:
    eos: int
    pad: int
    bos: int | None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def collapse_bos(ids: Ids, bos: int | None) -> Ids:
    """Drops one BOS of a leading `[BOS, BOS]`."""
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:]
    return ids


def end_with_eos(completion: Ids, eos: int, is_space: Callable[[Ids], bool] | None = None) -> Ids:
    """The completion ending with EOS.

    With `is_space` (conversational data), tokens after the last EOS that are
    only whitespace are cut instead of appending a second end.
    """
    if completion and completion[-1] == eos:
        return completion
    if is_space is not None and eos in completion:
        last = len(completion) - 1 - completion[::-1].index(eos)
        if is_space(completion[last + 1 :]):
            return completion[: last + 1]
    return completion + [eos]


def split_pair(
    prompt_ids: Ids,
    full_chosen: Ids,
    full_rejected: Ids,
    special: SpecialIds,
    is_space: Callable[[Ids], bool] | None = None,
) -> tuple[Ids, Ids, Ids]:
    """`(prompt, chosen, rejected)` ids from the tokenized prompt and full sequences.

    The completion starts where the prompt's ids stop being a prefix of both
    full sequences (tokens can merge across the boundary; templates can render
    a lone prompt differently), so `prompt + chosen` is exactly the full chosen
    sequence.
    """
    prompt_ids = collapse_bos(prompt_ids, special.bos)
    full_chosen = collapse_bos(full_chosen, special.bos)
    full_rejected = collapse_bos(full_rejected, special.bos)
    n = min(
        common_prefix_length(prompt_ids, full_chosen),
        common_prefix_length(prompt_ids, full_rejected),
    )
    return (
        prompt_ids[:n],
        end_with_eos(full_chosen[n:], special.eos, is_space),
        end_with_eos(full_rejected[n:], special.eos, is_space),
    )


# Failures of the machine, not of a row: a missing package (transformers raises
# ImportError when jinja2 is absent), memory, files. Recorded as row errors they would
# drop every row, and the cache would keep that after the machine is fixed.
ENVIRONMENT_ERRORS = (ImportError, MemoryError, OSError)
# Import names that pip knows by another name.
_PIP_NAMES = {"yaml": "pyyaml", "google": "protobuf", "sklearn": "scikit-learn", "PIL": "pillow"}
_REQUIREMENT = r"([A-Za-z][\w.\-]*?(?:[<>=!~]=[\w.]*\w)?)"


def missing_package(err: ImportError) -> str | None:
    """The pip requirement an ImportError asks for (`jinja2`, `jinja2>=3.1.6`), if it says."""
    if isinstance(err, ModuleNotFoundError) and err.name:
        top = err.name.split(".")[0]
        return _PIP_NAMES.get(top, top)
    text = str(err)
    for before in (r"requires (?:the )?", r"pip install (?:-U )?`?"):
        found = re.search(rf"{before}{_REQUIREMENT}[\s.,;`']", text + " ")
        if found:
            return found.group(1)
    return None


def environment_error(err: BaseException, what: str) -> UserError:
    """The UserError that stops tokenization on `err`, one of ENVIRONMENT_ERRORS; `what`
    is the part that failed ("the tokenizer", "the tokenizer's chat template")."""
    first = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, ImportError):
        package = missing_package(err)
        if package is None:
            return UserError(
                f"data.tokenizer: {what} needs a package that is not installed here "
                f"({first or repr(err)}): install it, then run the same command again"
            )
        old = any(c in package for c in "<>=") or "-U " in str(err) or "upgrade" in str(err)
        return UserError(
            f"data.tokenizer: {what} needs the package '{package}', which is not installed here"
            f"{' (or is too old)' if old else ''}: pip install {'-U ' if old else ''}"
            f"{shlex.quote(package)} (then run the same command again)"
        )
    return UserError(
        f"data.tokenizer: {what} failed on this machine, not on a row "
        f"({type(err).__name__}{': ' + first if first else ''}): "
        "fix that, then run the same command again"
    )


def _chat_ids(tokenizer: Tokenizer, conversations: list[Messages], **kwargs: Any) -> list[Ids | str]:
    """Chat-template ids per conversation, or the error message where the template fails."""
    try:
        out = tokenizer.apply_chat_template(
            conversations, tokenize=True, return_dict=True, **kwargs
        )
        return [list(ids) for ids in out["input_ids"]]
    except ENVIRONMENT_ERRORS as err:
        raise environment_error(err, "the tokenizer's chat template") from err
    except Exception:  # a template error in one row: find which, one by one
        pass
    result: list[Ids | str] = []
    for conv in conversations:
        try:
            out = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True, **kwargs)
            result.append(list(out["input_ids"]))
        except ENVIRONMENT_ERRORS as err:
            raise environment_error(err, "the tokenizer's chat template") from err
        except Exception as err:  # jinja raise_exception, a bad role, ...
            result.append(f"{type(err).__name__}: {err}")
    return result


def tokenize_records(
    batch: Mapping[str, list[Content]], tokenizer: Tokenizer, kind: Kind, special: SpecialIds
) -> dict[str, list]:
    """Batched records (`prompt`, `chosen`, `rejected` columns) -> untruncated ids.

    Returns columns `prompt_ids`, `chosen_ids`, `rejected_ids` (lists of ints;
    empty when the row failed) and `error` ('' or the chat template's message).
    A failure of the machine (ENVIRONMENT_ERRORS) raises a UserError instead.
    """
    try:
        return _tokenize_records(batch, tokenizer, kind, special)
    except ENVIRONMENT_ERRORS as err:
        raise environment_error(err, "the tokenizer") from err


def _tokenize_records(
    batch: Mapping[str, list[Content]], tokenizer: Tokenizer, kind: Kind, special: SpecialIds
) -> dict[str, list]:
    prompts, chosens, rejecteds = batch["prompt"], batch["chosen"], batch["rejected"]
    if kind == "standard":  # every value a string (normalize_row made them so)
        ps, cs, rs = (cast("list[str]", v) for v in (prompts, chosens, rejecteds))
        p = tokenizer(list(ps))["input_ids"]
        c = tokenizer([a + b for a, b in zip(ps, cs)])["input_ids"]
        r = tokenizer([a + b for a, b in zip(ps, rs)])["input_ids"]
        is_space = None
    else:  # every value a list of messages
        pm, cm, rm = (cast("list[Messages]", v) for v in (prompts, chosens, rejecteds))
        p = _chat_ids(tokenizer, [list(x) for x in pm], add_generation_prompt=True)
        c = _chat_ids(tokenizer, [list(a) + list(b) for a, b in zip(pm, cm)])
        r = _chat_ids(tokenizer, [list(a) + list(b) for a, b in zip(pm, rm)])

        def is_space(ids: Ids) -> bool:
            return not tokenizer.decode(ids).strip()

    out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "error": []}
    for pi, ci, ri in zip(p, c, r):
        errors = [x for x in (pi, ci, ri) if isinstance(x, str)]
        if errors:
            pair: tuple[Ids, Ids, Ids] = ([], [], [])
        else:
            pair = split_pair(list(pi), list(ci), list(ri), special, is_space)
        out["prompt_ids"].append(pair[0])
        out["chosen_ids"].append(pair[1])
        out["rejected_ids"].append(pair[2])
        out["error"].append(errors[0] if errors else "")
    return out


# --------------------------------------------------------------------------- #
# Truncation
# --------------------------------------------------------------------------- #
def truncated_lengths(
    prompt_len: np.ndarray,
    chosen_len: np.ndarray,
    rejected_len: np.ndarray,
    max_length: int,
    max_prompt_length: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lengths `[rows]` after truncation: the prompt first (to `max_prompt_length`,
    from the left), then each completion keeps its start within `max_length`.

    A row whose chosen or rejected length comes out 0 is to be dropped (`TOO_LONG`).
    """
    p = np.asarray(prompt_len)
    if max_prompt_length is not None:
        p = np.minimum(p, max_prompt_length)
    budget = np.maximum(max_length - p, 0)
    return p, np.minimum(chosen_len, budget), np.minimum(rejected_len, budget)


def keep_prompt_end(prompt_ids: Sequence[int], n: int, bos: int | None) -> Ids:
    """The last `n` prompt tokens; a leading BOS stays first and counts among the `n`."""
    ids = list(prompt_ids)
    if n >= len(ids):
        return ids
    if n <= 0:
        return []
    if bos is not None and ids[0] == bos:
        return [bos] + (ids[len(ids) - (n - 1) :] if n > 1 else [])
    return ids[len(ids) - n :]


def truncate_pair(
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    max_length: int,
    max_prompt_length: int | None,
    bos: int | None,
) -> tuple[Ids, Ids, Ids] | None:
    """The pair within the limits, or None when no completion token fits."""
    p, c, r = (
        int(x)
        for x in truncated_lengths(
            np.asarray(len(prompt_ids)),
            np.asarray(len(chosen_ids)),
            np.asarray(len(rejected_ids)),
            max_length,
            max_prompt_length,
        )
    )
    if c == 0 or r == 0:
        return None
    return keep_prompt_end(prompt_ids, p, bos), list(chosen_ids[:c]), list(rejected_ids[:r])


def pair_sequences(
    prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]
) -> tuple[list[Ids], list[Ids]]:
    """`(ids, completion_mask)` of one pair, each `[2][len]` (chosen, rejected).

    `completion_mask[k][t]` is 1 where `ids[k][t]` is a completion token.
    """
    ids = [list(prompt) + list(chosen), list(prompt) + list(rejected)]
    mask = [[0] * len(prompt) + [1] * len(chosen), [0] * len(prompt) + [1] * len(rejected)]
    return ids, mask
