"""Batched text generation with a KV cache: greedy decoding, or temperature / top-p sampling.

`generate(model, prompts, config, seed=)` continues a batch of token-id prompts of any
lengths and returns a `Generation` (the new tokens, how many belong to each response,
whether each row stopped at an EOS). `mmpo-jax generate` (`mmpo_jax.commands.generate`)
is the command line around it: prompts from a JSONL file, tokenized by
`tokenize_prompts` with the data pipeline's own functions (a plain string through the
chat template, as one user message, or as raw text: `PROMPT_FORMATS`).

Layout. The prompts of a batch are left-padded to a common length `P` (rounded up to a
bucket, so a run compiles once per bucket, not once per prompt length); every row then
writes its token `i` (i = 0, 1, ...) to the same cache slot `P + i`, so one scalar
`slot` indexes the cache for the whole batch. The cache is a pair `(k, v)`, each
`[layers, batch, kv_heads, P + max_new_tokens - 1, head_dim]` in the compute dtype
(the last new token is never fed back, so it needs no slot), sharded like the
activations: batch over `data` x `fsdp`, kv heads over `tensor`
(`mmpo_jax.sharding.logical_to_spec`).

Padding. Row `b` has `pad[b]` padding slots first. Its RoPE positions are
`slot - pad[b]`, so its first real token is at position 0, exactly as when the prompt
is run alone; its queries see key slots `pad[b] <= j <= slot` (and, on a sliding layer,
`slot - j < window`): never the padding. Hence a left-padded batch gives each
prompt the tokens it gets decoded alone (up to float rounding).

Compiles: one for the prefill (the whole prompt in one forward, which fills the cache
and picks the first new token) and one for the decode loop, per (batch, bucket).

Stopping: a row is done after it emits one of `config.eos_ids` (the EOS is kept in
`tokens` but not counted in `num_tokens`); later positions hold `pad_id`. The loop ends
when every row is done or after `max_new_tokens` tokens.

Sampling: `temperature == 0` is greedy (argmax of the float32 logits). Otherwise the
logits are divided by the temperature, cut to the smallest set of most likely tokens
whose probability reaches `top_p` (nucleus sampling, as transformers' `TopPLogitsWarper`:
temperature first, then top-p), and sampled. Row `r` of the whole job (`row_ids`) draws
token `i` with `fold_in(fold_in(key(seed), r), i)`: a prompt's sample depends only on
the seed, its row id and the model, not on the batch it was put in.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mmpo_jax.buckets import power_of_two_bucket
from mmpo_jax.data import formats
from mmpo_jax.errors import UserError
from mmpo_jax.logprobs import soft_capped
from mmpo_jax.paths import resolve
from mmpo_jax.sharding import BATCH_AXES, logical_to_spec
from mmpo_jax.train.step import compiler_options

if TYPE_CHECKING:
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.models.decoder import Decoder

SMALLEST_BUCKET = 16


# --------------------------------------------------------------------------- #
# Settings and result
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class GenerationConfig:
    """What to generate: at most `max_new_tokens` per row, stopping at any of `eos_ids`.

    `temperature` 0 is greedy; > 0 samples, from the top-`top_p` nucleus (1 = all
    tokens). `pad_id` fills a row's positions after its end (any id: they are
    never fed to the model as real tokens).
    """

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int = 0
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p}: must be in (0, 1] (1 = no nucleus cut)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class _Static(NamedTuple):
    """The compile-time part of the settings (a jit static argument); the EOS ids,
    temperature and top_p are traced, so changing their values does not recompile."""

    max_new_tokens: int
    pad_id: int
    greedy: bool
    use_top_p: bool


@dataclass
class Generation:
    """The new tokens of a batch, in the order of the prompts given.

    tokens      int32 [batch, max_new_tokens]  the generated tokens, the EOS included,
                                               then `pad_id`
    num_tokens  int32 [batch]                  tokens of the response (before the EOS)
    stopped     bool  [batch]                  True: ended with an EOS; False: ran to
                                               max_new_tokens
    """

    tokens: np.ndarray
    num_tokens: np.ndarray
    stopped: np.ndarray

    def response_ids(self, row: int) -> list[int]:
        """The response of `row` without the EOS: `tokens[row, :num_tokens[row]]`."""
        return [int(t) for t in self.tokens[row, : self.num_tokens[row]]]


# --------------------------------------------------------------------------- #
# Host-side batch layout
# --------------------------------------------------------------------------- #
def prompt_bucket(length: int) -> int:
    """The padded prompt length for a longest prompt of `length` tokens: the smallest
    power of two >= `length` (at least `SMALLEST_BUCKET`), so a job compiles once per
    bucket (log many), at most doubling the prefill's work."""
    return power_of_two_bucket(length, SMALLEST_BUCKET)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [B, P] int32, pad [B] int32)`: each prompt right-aligned in `P` columns
    (`P` = `length`, default the longest prompt), `pad[b]` columns of `pad_id` first."""
    longest = max(len(p) for p in prompts)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest prompt ({longest} tokens)")
    ids = np.full((len(prompts), length), pad_id, np.int32)
    pad = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        pad[b] = length - len(p)
        ids[b, pad[b]:] = np.asarray(p, np.int32)
    return ids, pad


# --------------------------------------------------------------------------- #
# Pure pieces of the jitted computation
# --------------------------------------------------------------------------- #
def attention_mask(pad: jax.Array, query_slots: jax.Array, num_slots: int) -> jax.Array:
    """bool `[B, T, S]`: query slot `query_slots[t]` of row `b` may see key slot `j`.

    pad `[B]`, query_slots `[T]` int. A key is visible when it is a real token of the
    row (`j >= pad[b]`) and not in the future (`j <= slot`). The model's sliding
    layers narrow it to their window (`Decoder.decode`: positions differ by as much as
    slots, padding being only at the start).
    """
    j = jnp.arange(num_slots)[None, None, :]
    q = query_slots[None, :, None]
    return (j >= pad[:, None, None]) & (j <= q)


def positions(pad: jax.Array, query_slots: jax.Array) -> jax.Array:
    """int32 `[B, T]`: the RoPE position of each slot, counted from the row's first real
    token (padding slots get 0; what they compute is never seen)."""
    return jnp.maximum(query_slots[None, :] - pad[:, None], 0).astype(jnp.int32)


def init_cache(model: Decoder, batch: int, num_slots: int) -> tuple[jax.Array, jax.Array]:
    """Zero `(k, v)` caches `[layers, batch, kv_heads, num_slots, head_dim]` in the
    compute dtype, sharded on the model's mesh (batch over the batch axes, kv heads
    over `tensor`, each only where it divides)."""
    cfg = model.cfg
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, num_slots, cfg.head_dim)
    k = jnp.zeros(shape, model.options.compute_dtype)
    v = jnp.zeros(shape, model.options.compute_dtype)
    if model.mesh is not None:
        sharding = jax.sharding.NamedSharding(model.mesh, cache_spec(shape, model.mesh))
        k = jax.lax.with_sharding_constraint(k, sharding)
        v = jax.lax.with_sharding_constraint(v, sharding)
    return k, v


def cache_spec(shape: Sequence[int], mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
    return logical_to_spec(("layers", "batch", "kv_heads", None, "head_dim"), shape, mesh)


def last_logits(model: Decoder, hidden: jax.Array) -> jax.Array:
    """float32 `[B, V]` logits of hidden `[B, D]` (float32 accumulation and the model's
    logit soft-cap, as `mmpo_jax.logprobs`)."""
    logits = jnp.einsum("bd,dv->bv", hidden, model.lm_head_kernel(), preferred_element_type=jnp.float32)
    return soft_capped(logits.astype(jnp.float32), model.logit_soft_cap)


def next_tokens(logits: jax.Array, row_keys: jax.Array | None, step: jax.Array | int,
                temperature: jax.Array, top_p: jax.Array, static: _Static) -> jax.Array:
    """int32 `[B]`: the token each row picks from its float32 logits `[B, V]`.

    Greedy: the argmax. Sampling: `logits / temperature`, then (with `use_top_p`) the
    nucleus: tokens sorted by probability are kept while the mass before them is
    below `top_p` (the most likely is always kept), then one draw per row with key
    `fold_in(row_keys[b], step)`.
    """
    if static.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
    if static.use_top_p:
        # sampling in sorted order: exact even when several tokens tie at the cut
        sorted_logits, order = jax.lax.top_k(logits, logits.shape[-1])
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        idx = jax.vmap(jax.random.categorical)(keys, sorted_logits)
        return jnp.take_along_axis(order, idx[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)




def _row_keys(seed: jax.Array, row_ids: jax.Array) -> jax.Array:
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(row_ids)


@functools.lru_cache(maxsize=None)
def _jitted(options: tuple[tuple[str, Any], ...]) -> tuple[Any, Any]:
    """The jitted `(_prefill, _decode)` under XLA `options` (the train step's: LLVM at -O0
    for small models on CPU, where compiling dominates; see
    `mmpo_jax.train.step.compiler_options`)."""
    opts = dict(options) or None
    prefill = jax.jit(_prefill, static_argnames=("graphdef", "static"), compiler_options=opts)
    decode = jax.jit(_decode, static_argnames=("graphdef", "static"), donate_argnames=("carry",),
                     compiler_options=opts)
    return prefill, decode


def _compiler_options(model: Decoder, state: Any) -> tuple[tuple[str, Any], ...]:
    mesh = model.mesh
    if mesh is None:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("devices",))
    num_params = sum(x.size for x in jax.tree.leaves(state))
    return tuple(sorted((compiler_options(mesh, num_params) or {}).items()))


def _merge(graphdef: Any, state: Any) -> Any:
    """The model inside a nested trace (the decode loop's body), on fresh Variable
    objects: NNX refuses Variables created at another trace level (as
    `mmpo_jax.train.state._merge`)."""
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


class _Carry(NamedTuple):
    """The decode loop's state (a pytree).

    cache   (k, v) `[layers, B, kv_heads, S, head_dim]`
    tokens  int32 [B, max_new_tokens]  the new tokens so far (pad_id after a row's end)
    last    int32 [B]                  the token to feed next
    done    bool  [B]                  the row has emitted an EOS
    length  int32 [B]                  new tokens of the row, its EOS included
    step    int32 []                   tokens picked so far (the next one is `step`)
    """

    cache: tuple[jax.Array, jax.Array]
    tokens: jax.Array
    last: jax.Array
    done: jax.Array
    length: jax.Array
    step: jax.Array


def _record(carry: _Carry, tok: jax.Array, eos: jax.Array, static: _Static) -> _Carry:
    """Stores the picked tokens `[B]` as token number `carry.step` (pad_id for rows
    already done); a row that picked one of `eos` `[E]` is done."""
    tok = jnp.where(carry.done, jnp.int32(static.pad_id), tok)
    tokens = jax.lax.dynamic_update_slice(carry.tokens, tok[:, None], (0, carry.step))
    return carry._replace(
        tokens=tokens,
        last=tok,
        length=carry.length + (~carry.done).astype(jnp.int32),
        done=carry.done | jnp.isin(tok, eos),
        step=carry.step + 1,
    )


def _prefill(graphdef: Any, state: Any, ids: jax.Array, pad: jax.Array, row_ids: jax.Array, eos: jax.Array,
             seed: jax.Array, temperature: jax.Array, top_p: jax.Array, static: _Static) -> _Carry:
    """The prompts `ids [B, P]` (left-padded by `pad [B]`) in one forward: fills cache
    slots 0..P-1 and picks token 0 from the last prompt position."""
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    cache = init_cache(model, b, p + static.max_new_tokens - 1)
    slots = jnp.arange(p, dtype=jnp.int32)
    mask = attention_mask(pad, slots, cache[0].shape[3])
    hidden, cache = model.decode(ids, positions(pad, slots), cache, jnp.int32(0), mask)
    logits = last_logits(model, hidden[:, -1])
    keys = None if static.greedy else _row_keys(seed, row_ids)
    carry = _Carry(
        cache=cache,
        tokens=jnp.full((b, static.max_new_tokens), static.pad_id, jnp.int32),
        last=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        length=jnp.zeros((b,), jnp.int32),
        step=jnp.int32(0),
    )
    return _record(carry, next_tokens(logits, keys, 0, temperature, top_p, static), eos, static)


# The decode loop is a `lax.while_loop` inside one jit rather than a Python loop over a
# jitted step: a Python step pays a dispatch per token (flattening every parameter of
# the model, then a host sync to test for EOS), which on CPU costs more than a tiny
# model's step itself (configs/tiny.yaml, batch 8, 63 steps on 2 busy cores: 3.1 ms a
# token in the loop against 11 ms in Python on one device; 5.2 against 27 ms on 8
# simulated devices) and on accelerators leaves them idle between steps. In the loop
# the cache stays in place as the loop carry, and the EOS test (`cond`) runs on device,
# ending the loop as soon as every row is done.
def _decode(graphdef: Any, state: Any, carry: _Carry, pad: jax.Array, row_ids: jax.Array, eos: jax.Array,
            seed: jax.Array, temperature: jax.Array, top_p: jax.Array, static: _Static) -> _Carry:
    """Tokens 1..max_new_tokens-1: each step feeds the last token at slot
    `P + step - 1` and picks the next, until every row is done."""
    num_slots = carry.cache[0].shape[3]
    p = num_slots - static.max_new_tokens + 1
    keys = None if static.greedy else _row_keys(seed, row_ids)

    def cond(c: _Carry) -> jax.Array:
        return (c.step < static.max_new_tokens) & ~jnp.all(c.done)

    def body(c: _Carry) -> _Carry:
        model = _merge(graphdef, state)
        slot = (p + c.step - 1).astype(jnp.int32)
        slots = slot[None]
        mask = attention_mask(pad, slots, num_slots)
        hidden, cache = model.decode(c.last[:, None], positions(pad, slots), c.cache, slot, mask)
        tok = next_tokens(last_logits(model, hidden[:, 0]), keys, c.step, temperature, top_p, static)
        return _record(c._replace(cache=cache), tok, eos, static)

    return jax.lax.while_loop(cond, body, carry)


# --------------------------------------------------------------------------- #
# The entry point
# --------------------------------------------------------------------------- #
def _batch_multiple(model: Decoder) -> int:
    """Rows a batch is padded to a multiple of: the devices the batch is split over."""
    if model.mesh is None:
        return 1
    return int(np.prod([model.mesh.shape[a] for a in BATCH_AXES]))


def _put(model: Decoder, host: np.ndarray) -> jax.Array:
    """A host array `[B, ...]` (the same on every process) as a global array split over the batch axes."""
    if model.mesh is None:
        return jnp.asarray(host)
    spec = logical_to_spec(("batch",) + (None,) * (host.ndim - 1), host.shape, model.mesh)
    sharding = jax.sharding.NamedSharding(model.mesh, spec)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _eos_array(ids: Sequence[int]) -> np.ndarray:
    """int32 `[E]`: the EOS ids padded with -1 (no token) to a multiple of 4, so that
    another set of EOS ids (up to 4) reuses the compiled programs; no ids: no stop."""
    n = max(4, -(-len(ids) // 4) * 4)
    return np.asarray(list(ids) + [-1] * (n - len(ids)), np.int32)


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def generate(model: Decoder, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, seed: int = 0,
             row_ids: Sequence[int] | None = None, batch_rows: int | None = None) -> Generation:
    """Continues each token-id prompt; see the module docstring.

    model: a `Decoder` (on its mesh, or on one device). prompts: B lists of ids, each
    non-empty, of any lengths (they are left-padded here). row_ids: the rows' ids for
    the sampling keys (default 0..B-1). batch_rows: pad the batch with dummy rows to
    this many (a fixed shape, so the last, smaller batch of a job reuses the compiled
    programs); it is also rounded up to a multiple of the devices the batch is split
    over. Returns the `Generation` of the B prompts.
    """
    if not prompts:
        raise ValueError("no prompts")
    if any(len(p) == 0 for p in prompts):
        raise UserError(f"prompt {[len(p) for p in prompts].index(0)} of the batch has no tokens")
    n = len(prompts)
    row_ids = list(range(n)) if row_ids is None else [int(r) for r in row_ids]
    rows = max(n, batch_rows or 0)
    multiple = _batch_multiple(model)
    rows = -(-rows // multiple) * multiple
    # dummy rows repeat the first prompt (and its row id, so its samples): they end
    # with it, never keeping the loop running longer; their tokens are dropped
    padded = list(prompts) + [prompts[0]] * (rows - n)
    row_ids = row_ids + [row_ids[0]] * (rows - n)
    ids, pad = left_pad(padded, config.pad_id, prompt_bucket(max(len(p) for p in prompts)))
    static = _Static(
        max_new_tokens=int(config.max_new_tokens),
        pad_id=int(config.pad_id),
        greedy=config.greedy,
        use_top_p=config.top_p < 1,
    )
    graphdef, state = nnx.split(model)
    args = (
        _put(model, pad),
        _put(model, np.asarray(row_ids, np.int32)),
        # numpy, not device arrays: replicated inputs that every process holds alike
        _eos_array(config.eos_ids),
        np.uint32(seed % 2**32),
        np.float32(config.temperature if config.temperature > 0 else 1.0),
        np.float32(config.top_p),
    )
    prefill, decode = _jitted(_compiler_options(model, state))
    carry = prefill(graphdef, state, _put(model, ids), *args, static=static)
    carry = decode(graphdef, state, carry, *args, static=static)
    tokens, length, done = (_to_host(x)[:n] for x in (carry.tokens, carry.length, carry.done))
    done = done.astype(bool)
    return Generation(tokens=tokens.astype(np.int32), num_tokens=(length - done).astype(np.int32), stopped=done)


# --------------------------------------------------------------------------- #
# Prompts: text and chat messages -> token ids, with the data pipeline's functions
# --------------------------------------------------------------------------- #
# How a plain-string prompt becomes ids (message lists always go through the template).
PROMPT_FORMATS = ("auto", "chat", "raw")


def uses_chat_template(tokenizer: Tokenizer, prompt_format: str) -> bool:
    """Whether `prompt_format` sends a plain-string prompt through the chat template:
    `chat` always, `raw` never, `auto` when the tokenizer has a template. A UserError
    for `chat` with a tokenizer that has none."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={prompt_format!r}: choose from {', '.join(PROMPT_FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise UserError("prompt format 'chat': the tokenizer has no chat template; "
                        "use the 'raw' prompt format, or a tokenizer with a chat template")
    return prompt_format == "chat" or (prompt_format == "auto" and has_template)


def tokenize_prompts(tokenizer: Tokenizer, prompts: Sequence[Any], where: Sequence[str] | None = None,
                     prompt_format: str = "raw") -> list[list[int]]:
    """Token ids of each prompt, with the data pipeline's functions; a doubled leading
    BOS collapsed (`formats.collapse_bos`).

    A list of `{role, content}` messages: the chat template with the generation prompt
    (the pipeline's conversational prompt). A string, by `prompt_format`: `raw` (the
    default: what preference-data callers such as `mmpo_jax.eval.win_rate` need, so a model
    trained on the data sees its prompts exactly as in training) tokenizes it as the
    pipeline tokenizes a standard prompt (the tokenizer's own special tokens); `chat`
    makes it the one-message conversation `[{"role": "user", "content": prompt}]`
    first (a chat model given raw text sees no turn to answer, and often ends at once);
    `auto` is `chat` when the tokenizer has a chat template, else `raw`.

    `where[i]` names prompt i in errors (default 'prompt i').
    """
    as_chat = uses_chat_template(tokenizer, prompt_format)
    where = [f"prompt {i}" for i in range(len(prompts))] if where is None else list(where)
    kinds: list[str | None] = []
    cleaned: list[Any] = []
    for w, p in zip(where, prompts):
        kind = formats.value_kind(p)
        value = formats._clean(p, kind) if kind is not None else None
        if value is None:
            raise UserError(
                f"{w}: 'prompt' must be a string or a non-empty list of {{\"role\", \"content\"}} messages "
                f"with string content, got {_short(p)}"
            )
        if kind == "standard" and as_chat and isinstance(value, str):
            kind, value = "conversational", [{"role": "user", "content": value}]
        kinds.append(kind)
        cleaned.append(value)
    out: list[Any] = [None] * len(prompts)
    text = [i for i, k in enumerate(kinds) if k == "standard"]
    chat = [i for i, k in enumerate(kinds) if k == "conversational"]
    if text:
        for i, ids in zip(text, tokenizer([cleaned[i] for i in text])["input_ids"]):
            out[i] = list(ids)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{where[chat[0]]}: the prompt is a list of messages, but the tokenizer has no "
                            "chat template; give string prompts or a tokenizer with one")
        results = formats._chat_ids(tokenizer, [cleaned[i] for i in chat], add_generation_prompt=True)
        for i, ids in zip(chat, results):
            if isinstance(ids, str):
                raise UserError(f"{where[i]}: the tokenizer's chat template failed: {ids}")
            out[i] = list(ids)
    bos = tokenizer.bos_token_id
    out = [formats.collapse_bos(ids, bos) for ids in out]
    for w, ids in zip(where, out):
        if not ids:
            raise UserError(f"{w}: the prompt has no tokens (an empty string, and the tokenizer adds no BOS)")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def eos_ids(tokenizer: Tokenizer | None, arch: Any = None, extra: Any = None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS, the model config's
    `eos_token_id` (an int or a list, e.g. Llama 3's end-of-turn ids) and `extra`
    (another int or list, e.g. a `generation_config.json`'s), without repeats."""
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(arch, "eos_token_id", None), extra):
        values = value if isinstance(value, (list, tuple)) else [value]
        ids += [int(v) for v in values if v is not None and int(v) not in ids]
    return tuple(ids)


def generation_config_eos(model_path: str) -> Any:
    """The `eos_token_id` of `<model_path>/generation_config.json` (None when there is none)."""
    if not model_path:
        return None
    # a local directory only: a hub id's snapshot is not looked up again (no network here)
    path = Path(resolve(model_path)).expanduser() / "generation_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("eos_token_id") if isinstance(data, Mapping) else None
