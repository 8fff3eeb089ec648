"""Capability probe accuracy of a run's policy (or reference): LM-harness multiple choice.

`mmpo_jax.data.probe` holds the items and the scoring; this module runs a model on
them. Every (item, option) becomes one row: the context's tokens then the option's
continuation tokens (`encode_request`), and the row's score is the continuation's
summed log-likelihood under the model,

    ll = sum_{t in continuation} log p(ids[t] | ids[:t]),

as LM-evaluation-harness's `loglikelihood` requests give it. `score_probe` turns
those into `acc` (top log-likelihood) and `acc_norm` (top log-likelihood per
character), overall and per category.

Batching. Rows are right-padded to a few bucket lengths (powers of two) and run
`rows_per_batch` at a time through one jitted forward per bucket, so the probe
compiles a handful of times, not once per item; padding rows and padding
positions have mask 0. The per-token log-probs come from `model_token_logps`,
the one place the shift lives (`logps[:, t]` predicts `ids[:, t]`), so the mask
is simply 1 on the continuation's positions. A row longer than the model's
context is cut from the left (the context's oldest tokens), as LM-harness does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmpo_jax.buckets import bucket_for, bucket_lengths
from mmpo_jax.data.probe import (
    ProbeItem,
    chat_request,
    encode_request,
    load_probe,
    plain_request,
    score_probe,
)
from mmpo_jax.errors import UserError
from mmpo_jax.logprobs import model_token_logps, sequence_logps
from mmpo_jax.sharding import BATCH_AXES
from mmpo_jax.train.setup import run_reference
from mmpo_jax.train.step import compiler_options

if TYPE_CHECKING:
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.models.decoder import Decoder
    from mmpo_jax.train.setup import Evaluator

Template = Literal["plain", "chat"]
TEMPLATES = ("plain", "chat")
SMALLEST_BUCKET = 32
ROWS_PER_BATCH = 32
# ids, mask [rows, seq] -> each row's masked log-prob sum [rows]
LoglikFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ProbeRow:
    """One option of one item: `ids` (context then continuation, possibly cut from the
    left) whose last `n_continuation` tokens are scored."""

    item: int
    option: int
    ids: tuple[int, ...]
    n_continuation: int


# --------------------------------------------------------------------------- #
# Items -> rows -> padded batches (pure, no model)
# --------------------------------------------------------------------------- #
def truncate_left(context_ids: Sequence[int], continuation_ids: Sequence[int],
                  max_length: int, where: str = "probe item") -> tuple[list[int], int]:
    """`(ids, n_continuation)`: context + continuation, at most `max_length` tokens,
    dropping the context's first tokens if needed. At least one context token must
    stay (it predicts the continuation's first token)."""
    n = len(continuation_ids)
    if n == 0:
        raise UserError(f"{where}: the option encodes to no tokens")
    if n >= max_length:
        raise UserError(f"{where}: the option has {n} tokens, which leaves no context in a "
                        f"{max_length}-token window")
    if not context_ids:
        raise UserError(f"{where}: the context encodes to no tokens (nothing predicts the option)")
    ids = list(context_ids) + list(continuation_ids)
    return ids[-max_length:], n


def probe_rows(items: Sequence[ProbeItem], tokenizer: Tokenizer, *, max_length: int,
               template: Template = "plain", system_prompt: str | None = None) -> list[ProbeRow]:
    """The rows of `items` in item-major, option-minor order.

    `plain`: LM-harness's 'Question: ...\\nAnswer:' with ' option' continuations (the
    tokenizer adds its BOS); `chat`: the question as a user turn through the tokenizer's
    chat template, whose rendering already holds the BOS.
    """
    if template not in TEMPLATES:
        raise UserError(f"probe template {template!r}: choose one of {', '.join(TEMPLATES)}")
    rows = []
    for i, item in enumerate(items):
        if template == "plain":
            context, continuations = plain_request(item)
        else:
            context, continuations = chat_request(item, tokenizer, system_prompt)
        for j, cont in enumerate(continuations):
            ctx_ids, cont_ids = encode_request(tokenizer, context, cont,
                                               add_special_tokens=template == "plain")
            ids, n = truncate_left(ctx_ids, cont_ids, max_length, f"probe item {item.id} option {j}")
            rows.append(ProbeRow(item=i, option=j, ids=tuple(ids), n_continuation=n))
    return rows


@dataclass(frozen=True)
class PaddedBatch:
    """`ids`, `mask` `[rows_per_batch, bucket]` (right padding, mask 1 on the continuation
    tokens) and `index` `[rows_per_batch]`: each row's position in the row list, -1 for
    padding rows."""

    ids: np.ndarray
    mask: np.ndarray
    index: np.ndarray


def pack_batches(rows: Sequence[ProbeRow], rows_per_batch: int, buckets: Sequence[int],
                 pad_id: int = 0) -> list[PaddedBatch]:
    """Rows grouped by bucket length (so one shape per bucket), `rows_per_batch` a batch."""
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch={rows_per_batch}: must be >= 1")
    by_bucket: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        by_bucket.setdefault(bucket_for(len(row.ids), buckets), []).append(r)
    batches = []
    for length in sorted(by_bucket):
        members = by_bucket[length]
        for start in range(0, len(members), rows_per_batch):
            chunk = members[start:start + rows_per_batch]
            ids = np.full((rows_per_batch, length), pad_id, np.int32)
            mask = np.zeros((rows_per_batch, length), np.float32)
            index = np.full((rows_per_batch,), -1, np.int64)
            for k, r in enumerate(chunk):
                row = rows[r]
                n = len(row.ids)
                ids[k, :n] = row.ids
                mask[k, n - row.n_continuation:n] = 1.0
                index[k] = r
            batches.append(PaddedBatch(ids=ids, mask=mask, index=index))
    return batches


def continuation_loglikelihoods(loglik: LoglikFn, rows: Sequence[ProbeRow], *, rows_per_batch: int,
                                buckets: Sequence[int], pad_id: int = 0) -> np.ndarray:
    """`[len(rows)]` float64: each row's continuation log-likelihood, in the rows' order."""
    out = np.full((len(rows),), np.nan, np.float64)
    for batch in pack_batches(rows, rows_per_batch, buckets, pad_id):
        values = np.asarray(loglik(batch.ids, batch.mask), np.float64)
        real = batch.index >= 0
        out[batch.index[real]] = values[real]
    return out


def regroup(items: Sequence[ProbeItem], rows: Sequence[ProbeRow], values: np.ndarray) -> list[list[float]]:
    """Per item, its options' log-likelihoods in option order (`score_probe`'s input)."""
    grouped: list[list[float]] = [[math.nan] * len(item.options) for item in items]
    for row, value in zip(rows, values):
        grouped[row.item][row.option] = float(value)
    return grouped


def flat_metrics(result: dict[str, Any], prefix: str = "capability") -> dict[str, float]:
    """`score_probe`'s result as flat `prefix/...` numbers: `acc`, `acc_norm`, `chance`,
    `n`, and `CATEGORY/acc`, `CATEGORY/acc_norm`, `CATEGORY/n` per category."""
    out = {f"{prefix}/{k}": float(result[k]) for k in ("acc", "acc_norm", "chance", "n")}
    for category, summary in result.get("by_category", {}).items():
        for k in ("acc", "acc_norm", "n"):
            out[f"{prefix}/{category}/{k}"] = float(summary[k])
    return out


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #
def batch_rows(mesh: jax.sharding.Mesh, rows_per_batch: int) -> int:
    """`rows_per_batch` rounded up to a multiple of the batch shards (mesh data x fsdp)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-rows_per_batch // shards) * shards


def loglik_function(model: Decoder, mesh: jax.sharding.Mesh, *, chunk: int | None) -> LoglikFn:
    """`(ids, mask) -> [rows]` masked sums of `model`'s per-token log-probs, jitted (one
    compile per input shape), rows split over the batch mesh axes.

    `model` is read as it is now: build the function again after training changes it
    (the train step donates the state's buffers)."""
    graphdef, state = nnx.split(model)
    replicated = NamedSharding(mesh, P())
    rows_sharding = NamedSharding(mesh, P(BATCH_AXES))
    num_params = sum(x.size for x in jax.tree.leaves(state))

    def forward(state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
        token_logps = model_token_logps(nnx.merge(graphdef, state), ids, chunk=chunk)
        assert not isinstance(token_logps, tuple)  # no entropy asked for: the log-probs alone
        out = sequence_logps(token_logps, mask, average=False)  # [rows]
        return jax.lax.with_sharding_constraint(out, replicated)

    jitted = jax.jit(forward, compiler_options=compiler_options(mesh, num_params))

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        # every process holds the same (global) rows: each device takes its slice
        put = [jax.make_array_from_callback(x.shape, rows_sharding, functools.partial(_rows_of, x))
               for x in (ids, mask)]
        return np.asarray(jitted(state, *put).addressable_data(0))

    return run


def probe_model(trainer: Evaluator, which: Literal["policy", "reference"] = "policy") -> Decoder:
    """The policy of `trainer`'s state, or its reference (the base model; for
    `precomputed`, the initial reference loaded again)."""
    if which == "policy":
        return trainer.sdef.policy(trainer.state)
    if which != "reference":
        raise ValueError(f"which={which!r}: 'policy' or 'reference'")
    model = run_reference(trainer)
    if model is not None:
        return model
    raise UserError(f"model.reference={trainer.sdef.reference_mode.name}: this run keeps no reference model to probe "
                    "(use model.reference=separate, precomputed, or lora_base with LoRA)")


def probe_accuracy(trainer: Evaluator, tokenizer: Tokenizer, items: Sequence[ProbeItem] | None = None, *,
                   which: Literal["policy", "reference"] = "policy", template: Template = "plain",
                   system_prompt: str | None = None, rows_per_batch: int = ROWS_PER_BATCH,
                   max_length: int | None = None, buckets: Sequence[int] | None = None) -> dict[str, Any]:
    """`score_probe`'s result (`acc`, `acc_norm`, `chance`, `n`, `by_category`) for the
    `which` model of `trainer` (from `build_trainer` or `restore_inference`) on `items`
    (default: the shipped probe).

    `max_length` (default: the model's `max_position_embeddings`) caps a row; `buckets`
    (default: powers of two up to it) are the padded lengths, one compile each.
    """
    items = load_probe() if items is None else list(items)
    max_length = trainer.arch.max_position_embeddings if max_length is None else max_length
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: a row needs a context and a continuation token")
    buckets = bucket_lengths(max_length, SMALLEST_BUCKET) if buckets is None else tuple(buckets)
    if max(buckets) < max_length:
        max_length = max(buckets)
    rows = probe_rows(items, tokenizer, max_length=max_length, template=template,
                      system_prompt=system_prompt)
    loglik = loglik_function(probe_model(trainer, which), trainer.mesh, chunk=trainer.cfg.model.logprob_chunk)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    values = continuation_loglikelihoods(loglik, rows, rows_per_batch=batch_rows(trainer.mesh, rows_per_batch),
                                         buckets=buckets, pad_id=pad_id)
    return score_probe(items, regroup(items, rows, values))


def _rows_of(x: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
    """A device's rows of a host array (`jax.make_array_from_callback`'s callback)."""
    return x[index]
