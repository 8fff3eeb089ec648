"""What the Pallas attention kernels (`splash`, `pallas_gpu`) need around them: rows
padded to the kernel's block, and one call per device under a mesh.

Padding goes at the end of each row. Real tokens come first and attention is causal, so
no real query sees it; a padded query sees the padding before it, never nothing, so no
query row is fully masked (the kernels return garbage for those).

A Pallas call is opaque to XLA's partitioner, so under a mesh the kernel runs inside
`shard_map`: rows over the batch axes, heads over `tensor` when the kv heads divide
evenly (else replicated there).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmpo_jax.sharding import BATCH_AXES

Kernel = Callable[[jax.Array, jax.Array, jax.Array, "jax.Array | None"], jax.Array]


def pad_rows(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, block: int
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """q, k, v `[B, T, *, H]` (and segment_ids `[B, T]`, padded with -1, a segment of its
    own) padded along T to a multiple of `block`."""
    t = q.shape[1]
    pad = -(-t // block) * block - t
    if not pad:
        return q, k, v, segment_ids
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    if segment_ids is not None:
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    return q, k, v, segment_ids


def per_device(kernel: Kernel, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
               mesh: jax.sharding.Mesh | None) -> jax.Array:
    """`kernel(q, k, v, segment_ids)` on each device's rows and heads of `mesh` (or
    directly, without one); q `[B, T, N, H]`, k/v `[B, T, K, H]`, segment_ids `[B, T]`."""
    if mesh is None:
        return kernel(q, k, v, segment_ids)

    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = BATCH_AXES if q.shape[0] % batch_shards == 0 else None
    heads = "tensor" if mesh.shape["tensor"] > 1 and k.shape[2] % mesh.shape["tensor"] == 0 else None
    qkv = P(rows, None, heads, None)
    if segment_ids is None:
        return jax.shard_map(lambda a, b, c: kernel(a, b, c, None), mesh=mesh, in_specs=(qkv, qkv, qkv),
                             out_specs=qkv, check_vma=False)(q, k, v)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)), out_specs=qkv,
                         check_vma=False)(q, k, v, segment_ids)
