"""TPU attention through the Pallas splash attention kernel (`model.attention: splash`,
what `auto` picks on TPU), for padded and packed rows alike.

The kernel attends one sequence `[heads, T, head_dim]` at a time under a static block
mask (causal, or causal within a sliding window) and optional `SegmentIds` (packed rows:
a query sees only its own segment), skipping the blocks the mask empties. Grouped-query
attention runs the kernel's multi-query form once per kv head over its group of query
heads. Scores are scaled by scaling q first (the kernel applies no scale) and soft-capped
by the kernel itself (Gemma 2).

Its sequence length must be a multiple of its block size: rows are padded up to a
multiple of `BLOCK` (128, the smallest TPU bucket) inside this call, and it runs per
device under a mesh (`mmpo_jax.models.kernel_rows`). Off TPU it runs in Pallas
interpret mode: exact, slow, for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from mmpo_jax.models.kernel_rows import pad_rows, per_device

if TYPE_CHECKING:
    from mmpo_jax.models.attention import MaskSpec

BLOCK = 128  # the kernel's smallest block (TPU lanes); sequences pad up to a multiple of it
_LARGEST_BLOCK = 512


def block_size(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length` (a multiple of BLOCK)."""
    for b in (_LARGEST_BLOCK, 256, BLOCK):
        if length % b == 0:
            return b
    raise ValueError(f"length {length} is not a multiple of {BLOCK}")


def _kernel(spec: MaskSpec, length: int, group: int, interpret: bool) -> Callable[..., jax.Array]:
    one: sa.Mask
    if spec.sliding_window is not None:
        one = sa.LocalMask((length, length), window_size=(spec.sliding_window - 1, 0), offset=0)
    elif spec.causal:
        one = sa.CausalMask((length, length))
    else:
        one = sa.FullMask((length, length))
    b = block_size(length)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sa.make_splash_mqa_single_device(
        mask=sa.MultiHeadMask([one] * group), block_sizes=blocks, attn_logits_soft_cap=spec.soft_cap,
        interpret=interpret,
    )


def _local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *, spec: MaskSpec,
           scale: float, interpret: bool) -> jax.Array:
    """Splash attention on one device's rows: q `[B, T, N, H]`, k/v `[B, T, K, H]`."""
    t = q.shape[1]
    q, k, v, segment_ids = pad_rows(q, k, v, segment_ids, BLOCK)
    b, padded, n, h = q.shape
    kv = k.shape[2]
    kernel = _kernel(spec, padded, n // kv, interpret)
    # [B, K, G, T, H] queries against [B, K, T, H] keys and values
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, padded, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def row(qr: jax.Array, kr: jax.Array, vr: jax.Array, seg: jax.Array | None) -> jax.Array:
        segments = None if seg is None else sa.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=segments))(qr, kr, vr)

    if segment_ids is None:
        out = jax.vmap(lambda qr, kr, vr: row(qr, kr, vr, None))(qg, kk, vv)
    else:
        out = jax.vmap(row)(qg, kk, vv, segment_ids.astype(jnp.int32))
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, padded, n, h)
    return out[:, :t].astype(v.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *, scale: float,
                     segment_ids: jax.Array | None, mesh: jax.sharding.Mesh | None,
                     interpret: bool) -> jax.Array:
    """q `[B, T, N, H]` over k, v `[B, T, K, H]` (see the module docstring); returns
    `[B, T, N, H]` in v's dtype."""
    return per_device(partial(_local, spec=spec, scale=scale, interpret=interpret), q, k, v, segment_ids, mesh)
