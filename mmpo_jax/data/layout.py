"""The batch layout, by `data.packing`: one object per layout, as `ReferenceMode` is for
`model.reference`.

- `none` (`PADDED`): pairs right-padded to a bucket length, `input_ids` `[pairs, 2, seq]`
  (`mmpo_jax.data.batches.PreferenceBatch`).
- `packed` (`PACKED`): the prompt + chosen and prompt + rejected sequences of several pairs
  share rows `[rows, pack_length]`; segment ids keep them apart in attention, and the
  pair-major view (`token_index`, `attention_mask`) maps the rows back to the pairs
  (`mmpo_jax.data.packing.PackedBatch`).
- `shared_prompt` (`SHARED_PROMPT`): as packed, each pair one sequence prompt | chosen |
  rejected; `branches` tell the answers apart, and attention reads the branched views of
  `mmpo_jax.models.attention.branched_segments` (the rejected answer never sees the chosen one).

Each layout owns its batch keys (`keys`), the shapes of a step's batch (`shapes`,
`example`, `abstract`), the device batch of a host batch (`device_batch`, which reads the
host batch's own `layout`) and the segments attention reads (`attention_segments`); the
step, `aot-check`, `pair_logps` and the model ask it instead of testing keys or shapes.
The step's batch is one typed `DeviceBatch` that carries its layout.

Imports numpy and jax only (the attention's `Segments` is the model's type): benchmarks
and the GPU image build steps from here without loading data code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmpo_jax.models.attention import Segments
from mmpo_jax.sharding import BATCH_AXES

if TYPE_CHECKING:
    from mmpo_jax.data.batches import PreferenceBatch
    from mmpo_jax.data.packing import PackedBatch
    from mmpo_jax.train.reference import ReferenceMode

# key -> (shape, dtype) of a step's batch
Shapes = dict[str, tuple[tuple[int, ...], Any]]

BATCH_KEYS = ("input_ids", "loss_mask", "pair_mask")
# a packed batch's rows and the map back to its pairs (mmpo_jax/data/packing.py)
PACKED_KEYS = (*BATCH_KEYS, "segment_ids", "positions", "sources", "token_index", "attention_mask")
SHARED_KEYS = (*PACKED_KEYS, "branches")
# the packed keys that are rows `[rows, pack_length]` (the others are pair-major)
ROW_KEYS = ("input_ids", "segment_ids", "positions", "sources", "branches")


@dataclass(frozen=True)
class Layout:
    """One `data.packing` layout (see the module docstring)."""

    name: str
    keys: tuple[str, ...]  # the host batch's arrays the step reads (reference keys apart)
    # the rows pack several sequences, apart by segment ids that attention reads (with
    # each token's RoPE position and predicting column); the cuDNN kernel takes none
    segments: bool = False
    # each pair one sequence, its prompt computed once: attention reads branched views
    shares_prompt: bool = False

    def shapes(self, pairs: int, seq: int, reference: ReferenceMode,
               rows: tuple[int, int] | None = None) -> Shapes:
        """The step's batch, key -> (shape, dtype), as `device_batch` builds it: `input_ids`,
        `loss_mask` `[pairs, 2, seq]` int32, `pair_mask` `[pairs]` int32, and the keys of
        `reference` (`precomputed`: `ref_logps` `[pairs, 2]` float32). A `segments` layout
        needs `rows` `(rows, pack_length)`: its rows are that shape, its pair-major arrays
        `seq` wide."""
        pair_major = ((pairs, 2, seq), np.int32)
        shapes: Shapes = {"input_ids": pair_major, "loss_mask": pair_major, "pair_mask": ((pairs,), np.int32)}
        if self.segments:
            if rows is None:
                raise ValueError(f"layout {self.name}: the batch's shapes need its rows (rows, pack_length)")
            shapes.update({k: (rows, np.int32) if k in ROW_KEYS else pair_major
                           for k in self.keys if k not in BATCH_KEYS})
            shapes["input_ids"] = (rows, np.int32)
        for key in reference.batch_keys:
            shapes[key] = ((pairs, 2), np.float32)
        return shapes

    def example(self, pairs: int, reference: ReferenceMode) -> DeviceBatch:
        """A batch of zeros with the step's fields and dtypes (its shapes do not matter:
        the steps read only its shardings, `batch_shardings`)."""
        shapes = self.shapes(pairs, 16, reference, (pairs, 16))
        zeros: dict[str, Any] = {k: np.zeros(s, d) for k, (s, d) in shapes.items()}  # host arrays
        return DeviceBatch(layout=self, **zeros)

    def abstract(self, pairs: int, seq: int, mesh: jax.sharding.Mesh, reference: ReferenceMode,
                 rows: tuple[int, int] | None = None) -> DeviceBatch:
        """`shapes` as ShapeDtypeStructs split over the mesh's batch axes (what an
        ahead-of-time compile lowers the step with)."""
        sharding = NamedSharding(mesh, P(BATCH_AXES))
        structs: dict[str, Any] = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding)  # no arrays
                                   for k, (s, d) in self.shapes(pairs, seq, reference, rows).items()}
        return DeviceBatch(layout=self, **structs)

    def attention_segments(self, batch: DeviceBatch) -> Segments:
        """The segments attention reads in `batch`'s rows (a `segments` layout): its
        segment ids, or for a shared prompt their branched views."""
        assert self.segments and batch.segment_ids is not None, f"layout {self.name} has no segment ids"
        if self.shares_prompt:
            assert batch.branches is not None, "a shared-prompt batch has branches"
            return Segments.branched_rows(batch.segment_ids, batch.branches)
        return Segments(batch.segment_ids)


PADDED = Layout("none", BATCH_KEYS)
PACKED = Layout("packed", PACKED_KEYS, segments=True)
SHARED_PROMPT = Layout("shared_prompt", SHARED_KEYS, segments=True, shares_prompt=True)
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (PADDED, PACKED, SHARED_PROMPT)}


def layout_of(name: str) -> Layout:
    """The layout of `data.packing` value `name` (the config's choices)."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"data.packing {name!r} not in {tuple(LAYOUTS)}") from None


@struct.dataclass(kw_only=True)
class DeviceBatch:
    """The step's batch: global arrays split over the batch mesh axes along their first
    axis (pairs, or rows), and the `layout` they are in (static: part of the compiled
    step). The fields of `layout.keys` are set, the others None; the same struct holds
    host arrays (`Layout.example`), ShapeDtypeStructs (`Layout.abstract`) or shardings
    (`batch_shardings`). Shapes (P pairs, R rows of `pack_length`):

        input_ids       int32 [P, 2, seq]   chosen at [:, 0], rejected at [:, 1]; packed: [R, pack]
        loss_mask       int32 [P, 2, seq]   1 on the completion tokens whose log-probs count
        pair_mask       int32 [P]           1 = real pair, 0 = padding (None: all real)
        segment_ids, positions, sources, branches   int32 [R, pack]   (`PackedBatch`)
        token_index, attention_mask                 int32 [P, 2, seq] (`PackedBatch`)
        ref_logps       float32 [P, 2]      reference sequence log-probs (`precomputed`)
    """

    # in the order of their names, the order jit flattened the dict batch this replaced
    # in: the compiled step's parameters, program and memory plan stay the same
    attention_mask: jax.Array | None = None
    branches: jax.Array | None = None
    input_ids: jax.Array
    loss_mask: jax.Array
    pair_mask: jax.Array | None = None
    positions: jax.Array | None = None
    ref_logps: jax.Array | None = None
    segment_ids: jax.Array | None = None
    sources: jax.Array | None = None
    token_index: jax.Array | None = None
    layout: Layout = struct.field(pytree_node=False, default=PADDED)


def batch_shardings(mesh: jax.sharding.Mesh, batch: DeviceBatch) -> DeviceBatch:
    """The sharding of each of `batch`'s arrays: split over the batch axes along its
    first (pairs or rows) axis; a `DeviceBatch` of NamedShardings (the steps' in_shardings)."""
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    return jax.tree.map(lambda _: sharding, batch)


def device_batch(batch: PreferenceBatch | PackedBatch, mesh: jax.sharding.Mesh,
                 ref_table: np.ndarray | None = None) -> DeviceBatch:
    """A host batch (this process's pairs) in its own layout (`batch.layout`) as the step's
    global arrays on `mesh`.

    `ref_table` `[rows, 2]` (model.reference=precomputed): the reference log-probs of
    every example, looked up by `example_index` (padding pairs get 0; they are masked).
    """
    host = {k: np.asarray(getattr(batch, k)) for k in batch.layout.keys}
    if ref_table is not None:
        index = np.asarray(batch.example_index)
        host["ref_logps"] = np.where((index >= 0)[:, None], ref_table[np.maximum(index, 0)], 0.0).astype(np.float32)
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    return DeviceBatch(layout=batch.layout,
                       **{k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()})
