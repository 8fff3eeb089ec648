"""GPU attention through the Pallas (Triton) flash-attention kernel of JAX
(`jax.experimental.pallas.ops.gpu.attention.mha`; `model.attention: pallas_gpu`), the
fused attention here that takes segment ids: packed rows on a GPU without a dense
`[T, T]` mask.

The kernel is causal and masks other segments' keys inside the blocks it computes; it
takes neither a sliding window nor a logit soft-cap, so Mistral's window and Gemma 2's
cap are refused at build time (its row of `mmpo_jax.models.kernels.KERNELS`). It has one
kv head per query head: grouped-query k and v are repeated to the query heads on each device (their
gradients sum back through the repeat). Scores are scaled by the kernel.

Its row length must be a multiple of its block: rows are padded up to a multiple of
`BLOCK` inside this call, and it runs per device under a mesh
(`mmpo_jax.models.kernel_rows`). Off GPU it runs in Pallas interpret mode: exact, slow,
for tests.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from mmpo_jax.errors import UserError
from mmpo_jax.models.kernel_rows import pad_rows, per_device

_MHA: ModuleType | None
_MHA_MISSING: ImportError | None = None
try:
    from jax.experimental.pallas.ops.gpu import attention as _gpu_attention

    _MHA = _gpu_attention
except ImportError as err:  # told when the kernel is asked for (`_mha`), not at import
    _MHA, _MHA_MISSING = None, err

BLOCK = 128  # the kernel's forward query and key blocks (its default); rows pad to a multiple


def _mha() -> Any:
    """The kernel, or a `UserError` naming the way out where this JAX lacks it."""
    if _MHA is None:  # an older or trimmed JAX: say so rather than fall back quietly
        raise UserError(f"model.attention=pallas_gpu needs jax.experimental.pallas.ops.gpu.attention, "
                        f"which this JAX {jax.__version__} cannot import ({_MHA_MISSING}); set model.attention "
                        f"to auto or xla") from _MHA_MISSING
    return _MHA


def _local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *, scale: float,
           interpret: bool) -> jax.Array:
    """The kernel on one device's rows: q `[B, T, N, H]`, k/v `[B, T, K, H]`."""
    ops = _mha()
    t, group = q.shape[1], q.shape[2] // k.shape[2]
    q, k, v, segment_ids = pad_rows(q, k, v, segment_ids, BLOCK)
    k, v = (jnp.repeat(x, group, axis=2) if group > 1 else x for x in (k, v))
    blocks = ops.BlockSizes(block_q=BLOCK, block_k=BLOCK, block_q_dkv=32, block_kv_dkv=32,
                            block_q_dq=32, block_kv_dq=32)
    segments = None if segment_ids is None else segment_ids.astype(jnp.int32)
    out = ops.mha(q, k, v, segments, sm_scale=scale, causal=True, block_sizes=blocks, interpret=interpret)
    return out[:, :t].astype(v.dtype)


def pallas_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                         segment_ids: jax.Array | None, mesh: jax.sharding.Mesh | None,
                         interpret: bool) -> jax.Array:
    """Causal q `[B, T, N, H]` over k, v `[B, T, K, H]` (see the module docstring);
    returns `[B, T, N, H]` in v's dtype."""
    return per_device(partial(_local, scale=scale, interpret=interpret), q, k, v, segment_ids, mesh)
