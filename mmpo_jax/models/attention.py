"""The models' one attention entry point.

`MaskSpec` says which keys a query sees and how its scores are shaped: causal,
a sliding window, a logit soft-cap. `attention` attends over whole sequences
(training, eval), optionally in the `Segments` of packed rows (a query sees only its
own segment) or of branched ones (the shared-prompt layout, `branched_segments`: a pair's
rejected answer follows its chosen one in the row and must not see it); `cached_attention`
attends over a KV cache (generation), where the caller's `allowed` mask holds what the
cache layout knows (causality, padding, the window).

Kernels (chosen once at build time from the table of `mmpo_jax.models.kernels`; here
they are only dispatched to). `xla` and `cudnn` are `jax.nn.dot_product_attention`'s (cuDNN's fused
kernel on GPU), `splash` the Pallas TPU kernel (`mmpo_jax.models.splash`: segment ids,
windows and the soft-cap inside the kernel), `pallas_gpu` the Pallas GPU flash kernel
(`mmpo_jax.models.pallas_gpu`: causal, segment ids). Otherwise a soft-cap, which
`jax.nn.dot_product_attention` does not take, and the KV cache use the explicit-scores
path here (float32 scores and softmax, as the xla backend). With segment ids the xla
backend masks a dense `[T, T]` score matrix: on GPU `auto`'s start line says so.
Masked scores are a large finite negative rather than -inf, so a query that sees no
key (a padding position) gets uniform weights instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mmpo_jax.models.kernels import KERNELS
from mmpo_jax.models.pallas_gpu import pallas_gpu_attention
from mmpo_jax.models.splash import splash_attention

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class MaskSpec:
    """Which keys a query sees; static, part of the compiled step.

    causal: a query sees no later key. sliding_window: with `causal`, a query sees
    itself and the `sliding_window - 1` keys before it (Mistral's window, as
    transformers applies it); None: every earlier key. soft_cap: scores become
    `soft_cap * tanh(scores / soft_cap)` before masking (Gemma 2's attention soft-cap);
    None: off.
    """

    causal: bool = True
    sliding_window: int | None = None
    soft_cap: float | None = None

    def __post_init__(self) -> None:
        if self.sliding_window is not None and (not self.causal or self.sliding_window < 1):
            raise ValueError(f"sliding_window={self.sliding_window} needs causal=True and a window >= 1")
        if self.soft_cap is not None and not self.soft_cap > 0:
            raise ValueError(f"soft_cap={self.soft_cap} must be > 0")


def branched_segments(segment_ids: jax.Array, branches: jax.Array) -> jax.Array:
    """`[2, B, T]` segment ids for the shared-prompt layout, from segment_ids `[B, T]` (a
    pair per segment) and branches `[B, T]` (0 prompt or padding, 1 chosen answer, 2
    rejected answer).

    Two ordinary causal segment attentions give the exact mask: view 0 splits each
    rejected answer into a segment of its own (the prompt and the chosen answer attend
    as one sequence), view 1 the chosen answer (the prompt and the rejected answer attend
    as one, and nothing of the chosen answer is seen). A rejected-answer token (odd in
    view 0) takes view 1's output, every other token view 0's. Any segment-id kernel runs
    it (the Pallas kernels here: the prompt's attention is computed twice, every
    projection once); XLA's dense path takes the union of both views' masks in one call
    (`same_segment`)."""
    twice = 2 * segment_ids
    return jnp.stack([twice + (branches == 2), twice + (branches == 1)]).astype(segment_ids.dtype)


@struct.dataclass
class Segments:
    """Which tokens of packed rows attend to each other beyond causality, as a batch
    layout hands them to the model (`mmpo_jax.data.layout.Layout.attention_segments`).

    ids `[B, T]` int: a query sees only keys of its own segment; with `branched` (static),
    `[2, B, T]`: the two views of `branched_segments` (a shared-prompt row)."""

    ids: jax.Array
    branched: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def branched_rows(cls, segment_ids: jax.Array, branches: jax.Array) -> Segments:
        """The segments of shared-prompt rows, from segment_ids and branches `[B, T]`."""
        return cls(branched_segments(segment_ids, branches), branched=True)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *, scale: float,
              implementation: Literal["xla", "cudnn", "splash", "pallas_gpu"],
              segments: Segments | None = None, mesh: jax.sharding.Mesh | None = None,
              interpret: bool = False) -> jax.Array:
    """Grouped-query attention of q `[B, T, N, H]` over k, v `[B, T, K, H]` (K kv heads
    divide the N query heads: query head n reads kv head n // (N // K)).

    segments: packed rows, a query sees only keys of its own segment (or, branched, as
    the two views of `branched_segments` allow). `implementation`: 'xla', 'cudnn', 'splash'
    or 'pallas_gpu', chosen at build time (`ModelOptions.kernel`, from the table of
    `mmpo_jax.models.kernels`, which refuses a mask the kernel does not take); the Pallas
    kernels run under `mesh`'s shard_map when given, in Pallas interpret mode with
    `interpret` (off their backend). Returns `[B, T, N, H]` in v's dtype.
    """
    if implementation not in KERNELS:
        raise ValueError(f"attention implementation {implementation!r}: one of {', '.join(KERNELS)}")
    # a caller that skipped the build-time choice: a bug to report, not a mask to drop
    lacking = KERNELS[implementation].lacks_masks(segments=segments is not None, causal=spec.causal,
                                                  sliding_window=spec.sliding_window is not None,
                                                  soft_cap=spec.soft_cap is not None)
    if lacking:
        raise ValueError(f"attention implementation {implementation!r} {'; it '.join(lacking)} "
                         "(ModelOptions.for_model chooses a kernel that takes the model's masks)")
    if segments is not None and segments.branched and implementation in ("splash", "pallas_gpu"):
        views = [attention(q, k, v, spec, scale=scale, implementation=implementation, segments=Segments(ids),
                           mesh=mesh, interpret=interpret) for ids in segments.ids]
        rejected = (segments.ids[0] % 2 == 1)[:, :, None, None]
        return jnp.where(rejected, views[1], views[0])
    # the kernels' own segment ids `[B, T]` (branched rows took the two calls above)
    segment_ids = None if segments is None else segments.ids
    if implementation == "splash":
        return splash_attention(q, k, v, spec, scale=scale, segment_ids=segment_ids, mesh=mesh,
                                interpret=interpret)
    if implementation == "pallas_gpu":
        return pallas_gpu_attention(q, k, v, scale=scale, segment_ids=segment_ids, mesh=mesh,
                                    interpret=interpret)
    if spec.soft_cap is not None:
        allowed = sequence_mask(spec, q.shape[1], segments)
        return _scores_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed, scale,
                                 spec.soft_cap)
    mask = None if segments is None else same_segment(segments)[:, None]  # [B, 1, T, T]
    window = None if spec.sliding_window is None else (spec.sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=spec.causal,
                                        local_window_size=window, implementation=implementation)


def cached_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, allowed: jax.Array,
                     spec: MaskSpec, *, scale: float) -> jax.Array:
    """Grouped-query attention of q `[B, T, N, H]` over a KV cache `[B, K, S, H]`.

    allowed `[B, T, S]` bool: True where a query may see a cache slot (the caller knows
    the slots' positions, so it applies causality, padding and the window:
    `window_mask`); `spec.soft_cap` applies here. Returns `[B, T, N, H]` in the cache's dtype.
    """
    return _scores_attention(q, cache_k, cache_v, allowed, scale, spec.soft_cap)


def window_mask(query_slots: jax.Array, num_slots: int, window: int) -> jax.Array:
    """`[T, S]` bool: query slot `query_slots[t]` is within `window` of key slot `j`
    (`slot - j < window`; causality is the caller's mask)."""
    return query_slots[:, None] - jnp.arange(num_slots)[None, :] < window


def sequence_mask(spec: MaskSpec, length: int, segments: Segments | None = None) -> jax.Array:
    """`[B or 1, T, T]` bool, True where query i may see key j under `spec` (and, with
    `segments`, only as `same_segment` allows)."""
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    allowed = jnp.ones((length, length), bool)
    if spec.causal:
        allowed &= j <= i
    if spec.sliding_window is not None:
        allowed &= window_mask(jnp.arange(length), length, spec.sliding_window)
    allowed = allowed[None]
    if segments is not None:
        allowed = allowed & same_segment(segments)
    return allowed


def same_segment(segments: Segments) -> jax.Array:
    """`[B, T, T]` bool: query i and key j share a segment, or, for the two views of
    branched `segments` (`branched_segments`), share one in either view: the whole
    branched mask in one dense call (the prompt sees itself, each answer the prompt and
    itself; causality hides a later answer from the chosen one)."""
    def same(ids: jax.Array) -> jax.Array:
        return ids[:, :, None] == ids[:, None, :]

    ids = segments.ids
    return same(ids[0]) | same(ids[1]) if segments.branched else same(ids)


def _scores_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float,
                      soft_cap: float | None) -> jax.Array:
    """q `[B, T, N, H]`, k/v `[B, K, S, H]`, allowed `[B, T, S]`: scores and softmax in
    float32, the weights cast back to v's dtype for the second matmul."""
    b, t, n, h = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * jnp.float32(scale)
    if soft_cap is not None:
        logits = jnp.float32(soft_cap) * jnp.tanh(logits / jnp.float32(soft_cap))
    logits = jnp.where(allowed[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, n, h)
