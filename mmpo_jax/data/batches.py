"""Batches of a split: the global batch of a step as a pure function of `(data.seed,
step)`, each process's slice of it, padded to a power-of-two bucket (`collate`), and
the plan of an epoch (`batch_plan`)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import numpy as np

from mmpo_jax.buckets import bucket_for, bucket_lengths
from mmpo_jax.data import formats
from mmpo_jax.data.layout import PACKED, PADDED, Layout, layout_of
from mmpo_jax.data.packing import PackedBatch, collate_packed, pack_plan, pair_tokens, row_tokens
from mmpo_jax.data.pipeline import PreferenceData
from mmpo_jax.errors import UserError

if TYPE_CHECKING:
    import grain

    from mmpo_jax.config_schema import DataConfig, RunConfig
    from mmpo_jax.data.prefetch import BatchTimes



SMALLEST_BUCKET = 16
_UNBOUNDED = sys.maxsize  # the train batches are indexed by step, without end


@dataclass(frozen=True)
class PackSpec:
    """How a run packs its batches (a `Layout.segments` layout: `data.packing: packed` or
    `shared_prompt`): rows of `pack_length` tokens, a step cut into `shards` x `micro`
    blocks, the pair-major view `width` wide, in `layout`."""

    pack_length: int
    shards: int  # batch shards of the mesh (mesh.data x mesh.fsdp)
    micro: int  # micro-batches of a step (optim.grad_accum; 1 for eval)
    width: int  # data.max_length
    layout: Layout = PACKED

    @classmethod
    def for_data(cls, data: DataConfig, shards: int, micro: int) -> PackSpec | None:
        """The spec of the settled `data` config section (None: an unpacked layout) over
        `shards` batch shards and `micro` micro-batches."""
        layout = layout_of(data.packing)
        if not layout.segments:
            return None
        assert data.pack_length is not None, "DataConfig.settled() sets a packed layout's pack_length"
        return cls(data.pack_length, shards, micro, data.max_length, layout)

    def for_eval(self) -> PackSpec:
        """The eval step runs a batch whole: one micro-batch."""
        return replace(self, micro=1)

    def collate(self, data: PreferenceData, rows: np.ndarray, mine: np.ndarray,
                process_index: int, process_count: int) -> PackedBatch:
        """This process's packed batch of the global batch `rows` `[pairs]` (-1: a padding
        pair), whose own pairs are `mine`."""
        if self.shards % process_count:
            raise UserError(f"the mesh's {self.shards} batch shards do not split over {process_count} processes")
        tokens = np.where(rows >= 0, row_tokens(data.lengths[np.maximum(rows, 0)], self.layout.shares_prompt), 0)
        plan = pack_plan(tokens, self.shards, self.micro, self.pack_length)
        first_block = process_index * (plan.blocks // process_count)
        pairs = [data.pair(int(i)) if i >= 0 else None for i in mine]
        return collate_packed(plan, pairs, mine, first_block, self.pack_length, self.width, data.special.pad,
                              self.layout)


def pack_spec(cfg: RunConfig, mesh: jax.sharding.Mesh) -> PackSpec | None:
    """How `cfg`'s batches are packed on `mesh` (None: `data.packing: none`)."""
    return PackSpec.for_data(cfg.data, mesh.shape["data"] * mesh.shape["fsdp"], cfg.optim.grad_accum)


# Batches
@flax.struct.dataclass
class PreferenceBatch:
    """Pair-major batch; shapes and dtypes in the module docstring."""

    input_ids: np.ndarray  # int32 [pairs, 2, seq]
    attention_mask: np.ndarray  # int32 [pairs, 2, seq]
    loss_mask: np.ndarray  # int32 [pairs, 2, seq]
    pair_mask: np.ndarray  # int32 [pairs]
    example_index: np.ndarray  # int32 [pairs]

    @property
    def layout(self) -> Layout:
        """`data.packing: none` (what `mmpo_jax.data.layout.device_batch` reads)."""
        return PADDED


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    example_index: Sequence[int] | np.ndarray,
    seq_len: int,
    pad_id: int,
    num_pairs: int | None = None,
) -> PreferenceBatch:
    """Right-pads `(prompt, chosen, rejected)` pairs into a batch of `num_pairs` (default
    `len(pairs)`) pairs of `seq_len` tokens; the extra pairs are padding (pair_mask 0)."""
    n = len(pairs) if num_pairs is None else num_pairs
    input_ids = np.full((n, 2, seq_len), pad_id, dtype=np.int32)
    attention = np.zeros((n, 2, seq_len), dtype=np.int32)
    completion = np.zeros((n, 2, seq_len), dtype=np.int32)
    for p, (prompt, chosen, rejected) in enumerate(pairs):
        seqs, masks = formats.pair_sequences(prompt, chosen, rejected)
        for k in (0, 1):
            t = len(seqs[k])
            input_ids[p, k, :t] = seqs[k]
            attention[p, k, :t] = 1
            completion[p, k, :t] = masks[k]
    completion[:, :, 0] = 0  # nothing predicts the first token
    pair_mask = np.zeros(n, dtype=np.int32)
    pair_mask[: len(pairs)] = 1
    index = np.full(n, -1, dtype=np.int32)
    index[: len(pairs)] = np.asarray(example_index, dtype=np.int32)
    return PreferenceBatch(input_ids, attention, completion, pair_mask, index)


def real_tokens(batch: PreferenceBatch | PackedBatch) -> int:
    """The batch's real tokens, the same for every layout: prompt + chosen plus prompt +
    rejected without padding (`2p + c + r` per pair; `packing.pair_tokens`)."""
    return int(np.asarray(batch.attention_mask).sum())


def computed_tokens(batch: PreferenceBatch | PackedBatch) -> int:
    """The tokens the model runs on: every position of `input_ids`, padding included."""
    return int(np.asarray(batch.input_ids).size)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise UserError(
            f"data.batch_size={batch_size} must be a multiple of the {process_count} processes"
        )
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def epoch_order(num_rows: int, seed: int) -> grain.MapDataset:
    """Element `epoch * num_rows + j` is the row at position `j` of that epoch's order."""
    import grain  # lazy: grain takes ~1 s to import; only the batch datasets need it (as in `prefetch`)

    return grain.MapDataset.range(num_rows).shuffle(seed=seed)


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return num_rows // batch_size


def global_batch_rows(
    order: grain.MapDataset, num_rows: int, batch_size: int, step: int
) -> np.ndarray:
    """`[batch_size]` rows of global batch `step` (a pure function of the seed and the step)."""
    per_epoch = steps_per_epoch(num_rows, batch_size)
    epoch, i = divmod(step, per_epoch)
    start = epoch * num_rows + i * batch_size
    return np.fromiter(
        (order[start + k] for k in range(batch_size)), dtype=np.int64, count=batch_size
    )


def train_batches(
    data: PreferenceData,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    times: BatchTimes | None = None,
    packing: PackSpec | None = None,
) -> grain.MapDataset:
    """Element `step` is this process's `PreferenceBatch` of global batch `step` (with
    `packing`, its `PackedBatch`).

    Index it (`ds[step]`) or iterate from a step (`mmpo_jax.data.prefetch.prefetched`,
    which builds them ahead on a thread); it never ends. `times` counts the time each
    batch takes to build.
    """
    import grain  # lazy: grain takes ~1 s to import; only the batch datasets need it (as in `prefetch`)

    process_index, process_count = _process(process_index, process_count)
    local = _local_slice(batch_size, process_index, process_count)
    n = len(data)
    if steps_per_epoch(n, batch_size) == 0:
        raise UserError(f"data.batch_size={batch_size} is larger than the {n} training rows kept")
    order = epoch_order(n, seed)
    seq = data.seq_lengths
    buckets = bucket_lengths(data.max_length, SMALLEST_BUCKET)

    def make(step: int) -> PreferenceBatch | PackedBatch:
        rows = global_batch_rows(order, n, batch_size, step)
        mine = rows[local]
        if packing is not None:
            return packing.collate(data, rows, mine, process_index, process_count)
        seq_len = bucket_for(int(seq[rows].max()), buckets)
        return collate([data.pair(int(i)) for i in mine], mine, seq_len, data.special.pad)

    return grain.MapDataset.range(_UNBOUNDED).map(make if times is None else times.timed(make))


def eval_batches(
    data: PreferenceData,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    packing: PackSpec | None = None,
) -> grain.MapDataset:
    """Every row once, in order; the last global batch is filled with padding pairs
    (with `packing`, packed batches of one micro-batch: `PackSpec.for_eval`)."""
    import grain  # lazy: grain takes ~1 s to import; only the batch datasets need it (as in `prefetch`)

    process_index, process_count = _process(process_index, process_count)
    local = _local_slice(batch_size, process_index, process_count)
    n = len(data)
    seq = data.seq_lengths
    buckets = bucket_lengths(data.max_length, SMALLEST_BUCKET)

    def make(b: int) -> PreferenceBatch | PackedBatch:
        rows = np.arange(b * batch_size, min((b + 1) * batch_size, n))
        mine = rows[local]  # may be short, or empty, on the last batch
        if packing is not None:
            full = np.full(batch_size, -1, np.int64)
            full[: len(rows)] = rows
            return packing.for_eval().collate(data, full, full[local], process_index, process_count)
        seq_len = bucket_for(int(seq[rows].max()), buckets)
        return collate(
            [data.pair(int(i)) for i in mine],
            mine,
            seq_len,
            data.special.pad,
            num_pairs=local.stop - local.start,
        )

    return grain.MapDataset.range(math.ceil(n / batch_size)).map(make)


@dataclass
class BatchPlan:
    """What one epoch of training batches looks like (epoch 0, for the configured seed)."""

    batch_size: int
    seed: int
    steps_per_epoch: int
    remainder: int  # rows left out of each epoch (the last incomplete global batch)
    buckets: list[int]
    rows_per_bucket: dict[int, int]  # by each row's own length
    batches_per_bucket: dict[int, int]  # by each global batch's padded length
    packing: str = "none"
    # over the epoch: `real_tokens` (2p + c + r per pair) and what the configured layout
    # computes (`computed_tokens`: padding included)
    real_tokens: int = 0
    computed_tokens: int = 0
    # packed: rows per step (shards x micro-batches x rows per block) -> steps
    steps_per_row_count: dict[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fill(self) -> float:
        """Real tokens per computed token (1: no padding)."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0


def batch_plan(data: PreferenceData, batch_size: int, seed: int, packing: PackSpec | None = None) -> BatchPlan:
    n = len(data)
    per_epoch = steps_per_epoch(n, batch_size)
    buckets = bucket_lengths(data.max_length, SMALLEST_BUCKET)
    seq = data.seq_lengths
    tokens = pair_tokens(data.lengths)
    in_rows = tokens if packing is None else row_tokens(data.lengths, packing.layout.shares_prompt)
    rows = {b: 0 for b in buckets}
    for length in seq:
        rows[bucket_for(int(length), buckets)] += 1
    batches = {b: 0 for b in buckets}
    row_counts: dict[int, int] = {}
    real = computed = 0
    order = epoch_order(n, seed) if per_epoch else None
    for step in range(per_epoch):
        idx = global_batch_rows(order, n, batch_size, step)
        bucket = bucket_for(int(seq[idx].max()), buckets)
        batches[bucket] += 1
        real += int(tokens[idx].sum())
        if packing is None:
            computed += 2 * batch_size * bucket
        else:
            plan = pack_plan(in_rows[idx], packing.shards, packing.micro, packing.pack_length)
            row_counts[plan.rows] = row_counts.get(plan.rows, 0) + 1
            computed += plan.rows * packing.pack_length
    return BatchPlan(
        batch_size, seed, per_epoch, n - per_epoch * batch_size, list(buckets), rows, batches,
        (PADDED if packing is None else packing.layout).name, real, computed,
        None if packing is None else dict(sorted(row_counts.items())),
    )
