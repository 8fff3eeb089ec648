"""Judge-based win rate of a run's policy against its reference model (issue #9).

Both models answer every test prompt greedily (`mmpo_jax.eval.generate`); the demo
data's rule-based judge (`mmpo_jax.data.demo_judge.judge`) marks each answer
correct or not. Per prompt:

    policy correct, reference wrong   win
    policy wrong, reference correct   loss
    both the same                     tie

    win_rate = (wins + 0.5 * ties) / n

so a policy that answers exactly as its reference scores 0.5. Also reported:
`judge_accuracy` (the policy's fraction judged correct) and
`reference_judge_accuracy` (the reference's).

Two halves: `win_rate` / `judge_win_rate` count verdicts (pure, no model);
`evaluate_win_rate` generates the answers with an `Evaluator`'s policy and reference.

The reference model is the one the run started from (`reference_model`):
`model.reference=separate`: its frozen copy (the initial policy, or
`model.reference_path`); `lora_base`: the base without the LoRA adapters;
`precomputed`: the initial weights (or `model.reference_path`), loaded again
(the state keeps only their log-probs); `none`: the initial model,
loaded again from `model.path` (or the random init of `model.init` with
`train.seed`). Its description says which.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpo_jax.data.demo_judge import FORMATS, judge
from mmpo_jax.data.sources import read_source, source_specs
from mmpo_jax.data.tokenizers import special_ids
from mmpo_jax.errors import UserError
from mmpo_jax.eval.generate import GenerationConfig, eos_ids, generate, generation_config_eos, tokenize_prompts
from mmpo_jax.eval.options import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from mmpo_jax.files import write_text_atomic
from mmpo_jax.train.reference import held_model
from mmpo_jax.train.setup import initial_reference

if TYPE_CHECKING:
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.models.decoder import Decoder
    from mmpo_jax.train.setup import Evaluator

PREFIX = "win_rate"
# Keys of `win_rate`'s result, in the order they are printed.
KEYS = ("win_rate", "judge_accuracy", "reference_judge_accuracy", "wins", "ties", "losses", "n")
# DEFAULT_MAX_NEW_TOKENS, DEFAULT_BATCH_SIZE: in `mmpo_jax.eval.options` (the flags' defaults)
# The fields the judge reads besides the prompt (see `demo_tasks`).
JUDGE_FIELDS = ("format", "answer", "options")


# --------------------------------------------------------------------------- #
# Counting (pure)
# --------------------------------------------------------------------------- #
def outcome(policy_ok: bool, reference_ok: bool) -> str:
    """'win', 'loss' or 'tie' of one prompt."""
    if policy_ok == reference_ok:
        return "tie"
    return "win" if policy_ok else "loss"


def win_rate(policy_ok: Sequence[bool], reference_ok: Sequence[bool]) -> dict[str, float]:
    """The counts and rates of per-prompt verdicts (`policy_ok[i]`: the policy's answer to
    prompt i was judged correct; `reference_ok[i]`: the reference's).

    Returns `{win_rate, judge_accuracy, reference_judge_accuracy, wins, ties, losses, n}`
    (all floats; the counts are whole numbers).
    """
    if len(policy_ok) != len(reference_ok):
        raise ValueError(f"{len(policy_ok)} policy verdicts but {len(reference_ok)} reference verdicts: "
                         "one of each per prompt")
    n = len(policy_ok)
    if n == 0:
        raise ValueError("no verdicts: the win rate needs at least one prompt")
    counts = {"win": 0, "tie": 0, "loss": 0}
    for p, r in zip(policy_ok, reference_ok):
        counts[outcome(bool(p), bool(r))] += 1
    return {
        "win_rate": (counts["win"] + 0.5 * counts["tie"]) / n,
        "judge_accuracy": sum(bool(p) for p in policy_ok) / n,
        "reference_judge_accuracy": sum(bool(r) for r in reference_ok) / n,
        "wins": float(counts["win"]),
        "ties": float(counts["tie"]),
        "losses": float(counts["loss"]),
        "n": float(n),
    }


def judge_verdicts(records: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> list[bool]:
    """`judge(record, response)` of each record and its response."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    return [bool(judge(rec, resp)) for rec, resp in zip(records, responses)]


def judge_win_rate(records: Sequence[Mapping[str, Any]], policy_responses: Sequence[str],
                   reference_responses: Sequence[str]) -> dict[str, float]:
    """`win_rate` of the judge's verdicts on the policy's and the reference's responses
    (one of each per demo record, in the records' order)."""
    return win_rate(judge_verdicts(records, policy_responses), judge_verdicts(records, reference_responses))


def prefixed(metrics: Mapping[str, float], prefix: str = PREFIX) -> dict[str, float]:
    """`{prefix/key: value}` in `KEYS` order (the `eval --json` keys)."""
    return {f"{prefix}/{k}": float(metrics[k]) for k in KEYS}


# --------------------------------------------------------------------------- #
# The test prompts
# --------------------------------------------------------------------------- #
def check_judge_fields(rows: Sequence[Mapping[str, Any]], where: Sequence[str]) -> None:
    """Every row must have a prompt and the fields the judge reads, with a known format."""
    for w, row in zip(where, rows):
        missing = [k for k in ("prompt",) + JUDGE_FIELDS if k not in row]
        if missing:
            raise UserError(
                f"{w}: no {', '.join(repr(k) for k in missing)} field; the win rate's judge needs the demo "
                "data's fields (prompt, format, answer, options: see mmpo_jax.data.demo_tasks), "
                "e.g. data.test_files=builtin:demo")
        if row["format"] not in FORMATS:
            raise UserError(f"{w}: format {row['format']!r} is not one the judge knows ({', '.join(FORMATS)})")


def judged_rows(cfg: Any, limit: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """`(rows, where)`: the raw rows of `data.test_files` (every source, in order; the
    first `limit`, 0 = all) with the judge's fields checked, and a name of each row for
    errors."""
    if limit < 0:
        raise UserError(f"--win-rate-limit={limit}: must be >= 0 (0 = every test prompt)")
    specs = source_specs(cfg.data, "test")
    if not specs:
        raise UserError("the win rate needs test prompts: set data.test_files (e.g. data.test_files=builtin:demo)")
    rows: list[dict[str, Any]] = []
    where: list[str] = []
    for spec in specs:
        raw = read_source(spec, cfg.data.cache_dir)
        rows += raw.rows
        where += [f"{spec.key}: '{raw.name}' {raw.label} {n}" for n in raw.numbers]
        if limit and len(rows) >= limit:
            break
    if limit:
        rows, where = rows[:limit], where[:limit]
    if not rows:
        raise UserError(f"{specs[0].key}: the test data has no rows")
    check_judge_fields(rows, where)
    return rows, where


# --------------------------------------------------------------------------- #
# The models
# --------------------------------------------------------------------------- #
def reference_model(trainer: Evaluator) -> tuple[Decoder, str]:
    """`(model, description)`: the model `trainer`'s run started from (see the module
    docstring), as a `Decoder` on the trainer's mesh."""
    cfg = trainer.cfg
    mode = trainer.sdef.reference_mode
    held = held_model(trainer)
    if held is not None:
        return held, mode.describe(cfg)
    return initial_reference(trainer), (f"{mode.source(cfg)}, loaded again "
                                        f"(model.reference={mode.name} keeps no reference model in the state)")


def generate_responses(model: Decoder, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], config: Any,
                       batch_size: int = DEFAULT_BATCH_SIZE,
                       progress: Callable[[int], None] | None = None) -> list[str]:
    """The decoded responses (special tokens dropped) of `model` to token-id `prompts`,
    `batch_size` prompts per `generate` call (one compiled shape for every batch)."""
    if batch_size < 1:
        raise UserError(f"win rate batch size {batch_size}: must be >= 1")
    out: list[str] = []
    for first in range(0, len(prompts), batch_size):
        batch = list(prompts[first:first + batch_size])
        gen = generate(model, batch, config, row_ids=list(range(first, first + len(batch))),
                       batch_rows=min(batch_size, len(prompts)))
        out += [tokenizer.decode(gen.response_ids(j), skip_special_tokens=True) for j in range(len(batch))]
        if progress is not None:
            progress(len(out))
    return out


@dataclass
class WinRateResult:
    """The win rate of one evaluation.

    metrics:    `win_rate`'s dict (unprefixed)
    policy:     which policy answered, in words
    reference:  which reference model answered, in words
    records:    per prompt: id, prompt, policy/reference response, verdicts, outcome
    """

    metrics: dict[str, float]
    policy: str
    reference: str
    records: list[dict[str, Any]] = field(default_factory=list)


def evaluate_win_rate(trainer: Evaluator, tokenizer: Tokenizer, *, limit: int = 0,
                      max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
                      policy: str = "the policy", log: Callable[[str], None] | None = None) -> WinRateResult:
    """Greedy answers of `trainer`'s policy and reference model to the test prompts of its
    config (the first `limit`, 0 = all), judged and counted; see the module docstring.
    """
    say = log or (lambda text: None)
    cfg = trainer.cfg
    rows, where = judged_rows(cfg, limit)
    prompts = tokenize_prompts(tokenizer, [r["prompt"] for r in rows], where)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids(tokenizer, trainer.arch, generation_config_eos(cfg.model.path)),
        pad_id=special_ids(tokenizer).pad,
    )
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > trainer.arch.max_position_embeddings:
        say(f"warning: the longest test prompt ({longest} tokens) + {max_new_tokens} new tokens exceeds the "
            f"model's max_position_embeddings={trainer.arch.max_position_embeddings}")
    ref_model, ref_what = reference_model(trainer)
    say(f"win rate: {len(rows)} test prompts, greedy, at most {max_new_tokens} new tokens; "
        f"reference: {ref_what}")
    answers: dict[str, list[str]] = {}
    for name, model in (("policy", trainer.sdef.policy(trainer.state)), ("reference", ref_model)):

        def progress(done: int, name: str = name) -> None:
            say(f"win rate: {name} answered {done}/{len(rows)}")

        answers[name] = generate_responses(model, tokenizer, prompts, config, batch_size, progress=progress)
    del ref_model
    policy_ok = judge_verdicts(rows, answers["policy"])
    reference_ok = judge_verdicts(rows, answers["reference"])
    records = [
        {"id": row.get("id", w), "prompt": row["prompt"], "policy_response": p, "reference_response": r,
         "policy_correct": pc, "reference_correct": rc, "outcome": outcome(pc, rc)}
        for row, w, p, r, pc, rc in zip(rows, where, answers["policy"], answers["reference"], policy_ok, reference_ok)
    ]
    return WinRateResult(win_rate(policy_ok, reference_ok), policy, ref_what, records)


def write_generations(path: str | Path, result: WinRateResult) -> None:
    """JSON lines: one record per prompt (see `WinRateResult.records`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in result.records))
