"""Packed batches (`data.packing: packed`): the prompt + chosen and prompt + rejected
sequences of several pairs share rows of `data.pack_length` tokens, with no padding
between them. `data.packing: shared_prompt` packs each pair as ONE sequence, prompt |
chosen answer | rejected answer (`p + c + r` tokens), computing the prompt once: the
rejected answer's positions continue from the prompt's end (each token keeps its
position of the unpacked layout), its first token is predicted from the prompt's last
one (`sources`), and it never attends to the chosen answer (`branches`;
`mmpo_jax.models.attention.branched_segments`).

A step's pairs are cut into blocks, one per (batch shard, micro-batch): `blocks =
shards x optim.grad_accum`, `P = pairs / blocks` pairs each. Each block's pairs are
packed on their own into `R` rows, both sequences of a pair in one row (the pair's
`2p + c + r` tokens, or `p + c + r` shared, fit: `data.pack_length >= 2 x
data.max_length`), first-fit by
decreasing length. `R` is the same for every block of the step: the smallest of
`row_buckets(P)` that holds the fullest block, so an epoch compiles a few shapes
(at most `EXACT_ROWS` for the usual few pairs per block).

`PackedBatch` (numpy; this process's pairs and rows, `rows = local blocks x R`):

    input_ids     int32 [rows, pack]        the packed tokens, `pad` after the last sequence
    segment_ids   int32 [rows, pack]        1, 2, ... per sequence of a row, 0 on padding
    positions     int32 [rows, pack]        each token's position in its own sequence
    sources       int32 [rows, pack]        the column whose hidden state predicts each
                                            token: the one before it, but the prompt's
                                            last for a shared row's rejected answer
    branches      int32 [rows, pack] | None shared_prompt: 0 prompt and padding, 1 chosen
                                            answer, 2 rejected answer; None for packed
    token_index   int32 [pairs, 2, width]   where token t of a pair's chosen ([:, 0]) or
                                            rejected ([:, 1]) sequence lies in the rows of
                                            its micro-batch, flattened (row * pack + column;
                                            0 off the sequence; a shared row's prompt
                                            serves both)
    attention_mask, loss_mask, pair_mask, example_index: as `PreferenceBatch`'s
                                            (pair-major, right-padded to `width`)
    layout                                  `mmpo_jax.data.layout.PACKED` or `SHARED_PROMPT`

Order. The step splits a batch into micro-batches by stride (micro-batch `a` holds
pairs `a, a+n, ...` and rows `a, a+n, ...`), and the batch shards take contiguous
slices, so block (shard d, micro-batch a) holds pairs `d*n*P + a + k*n` and rows
`d*n*R + a + r*n`; in micro-batch `a` that row sits at `d*R + r`, the row `token_index`
counts in. A pair's tokens therefore stay on the device that holds the pair.

Every process computes the plan of the whole global batch (it holds every row's
lengths), so all agree on `R` and on where their rows go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import flax.struct
import numpy as np

from mmpo_jax.data import formats
from mmpo_jax.data.layout import PACKED, Layout


@flax.struct.dataclass
class PackedBatch:
    """Packed rows plus the pair-major view; shapes in the module docstring."""

    input_ids: np.ndarray  # int32 [rows, pack]
    segment_ids: np.ndarray  # int32 [rows, pack]
    positions: np.ndarray  # int32 [rows, pack]
    sources: np.ndarray  # int32 [rows, pack]
    token_index: np.ndarray  # int32 [pairs, 2, width]
    attention_mask: np.ndarray  # int32 [pairs, 2, width]
    loss_mask: np.ndarray  # int32 [pairs, 2, width]
    pair_mask: np.ndarray  # int32 [pairs]
    example_index: np.ndarray  # int32 [pairs]
    branches: np.ndarray | None = None  # int32 [rows, pack]: a layout that shares the prompt only
    layout: Layout = flax.struct.field(pytree_node=False, default=PACKED)  # the rows' layout


EXACT_ROWS = 8  # up to this many rows a block takes exactly the rows it needs


def row_buckets(pairs_per_block: int) -> tuple[int, ...]:
    """Row counts a block may take: 1 .. EXACT_ROWS, then 12, 16, 24, 32, ... (at most
    half as many rows again as needed), capped by `pairs_per_block` (a row per pair
    always suffices). Exact small counts matter: a block of 8 pairs of ~1.2k tokens
    needs 3-7 rows of 2048, and rounding 5 up to 6 wastes a sixth of the step."""
    out = list(range(1, min(EXACT_ROWS, pairs_per_block) + 1))
    k = EXACT_ROWS
    while k < pairs_per_block:
        out += [k + k // 2, 2 * k]
        k *= 2
    return (*sorted(x for x in set(out) if x < pairs_per_block), pairs_per_block)


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of item indices: each item (a pair, `lengths[i]` tokens) goes into the first
    row with room, longest items first (ties by index: deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        need = int(lengths[i])
        if need > capacity:
            raise ValueError(f"a pair of {need} tokens does not fit a row of {capacity}")
        for r, free in enumerate(room):
            if need <= free:
                rows[r].append(i)
                room[r] -= need
                break
        else:
            rows.append([i])
            room.append(capacity - need)
    return rows


@dataclass(frozen=True)
class PackPlan:
    """Which of a step's pairs share which row; see the module docstring."""

    blocks: int  # shards x micro-batches
    micro: int  # micro-batches (optim.grad_accum)
    pairs_per_block: int
    rows_per_block: int  # R, from row_buckets
    # per block (d * micro + a): its rows, each a list of pair slots k (pair d*n*P + a + k*n)
    block_rows: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def rows(self) -> int:
        return self.blocks * self.rows_per_block

    def block_pairs(self, block: int) -> np.ndarray:
        """The global pair positions `[P]` of `block`, by slot k."""
        d, a = divmod(block, self.micro)
        n, p = self.micro, self.pairs_per_block
        return d * n * p + a + n * np.arange(p)


def pack_plan(tokens: np.ndarray, shards: int, micro: int, pack_length: int) -> PackPlan:
    """The plan of a step whose pairs take `tokens` `[pairs]` tokens of a row each
    (`row_tokens`; 0 for a padding pair), over `shards` batch shards and `micro`
    micro-batches."""
    pairs = len(tokens)
    blocks = shards * micro
    if pairs % blocks:
        raise ValueError(f"{pairs} pairs do not split into {shards} shards x {micro} micro-batches")
    per = pairs // blocks
    plan = PackPlan(blocks, micro, per, 0, ())
    block_rows = []
    for b in range(blocks):
        lengths = tokens[plan.block_pairs(b)]
        real = [k for k in range(per) if lengths[k] > 0]
        rows = first_fit([int(lengths[k]) for k in real], pack_length)
        block_rows.append(tuple(tuple(real[i] for i in row) for row in rows))
    needed = max((len(r) for r in block_rows), default=0)
    buckets = row_buckets(per)
    rows_per_block = next(b for b in buckets if b >= max(needed, 1))
    return PackPlan(blocks, micro, per, rows_per_block, tuple(block_rows))


def collate_packed(
    plan: PackPlan,
    pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]] | None],
    example_index: np.ndarray,
    first_block: int,
    pack_length: int,
    width: int,
    pad_id: int,
    layout: Layout = PACKED,
) -> PackedBatch:
    """This process's `PackedBatch`: blocks `first_block ..` of `plan`, whose pairs are
    `pairs` (`(prompt, chosen, rejected)` ids in global pair order from the first pair
    of `first_block`; None for a padding pair) with `example_index` (-1: padding), in
    `layout` (packed or shared-prompt rows)."""
    shared = layout.shares_prompt
    n, per, r_blk = plan.micro, plan.pairs_per_block, plan.rows_per_block
    local_pairs = len(pairs)
    local_blocks = local_pairs // per
    shard0 = first_block // n
    base_pair = shard0 * n * per
    ids = np.full((local_blocks * r_blk, pack_length), pad_id, np.int32)
    segments = np.zeros_like(ids)
    positions = np.zeros_like(ids)
    sources = np.zeros_like(ids)
    branches = np.zeros_like(ids)
    token_index = np.zeros((local_pairs, 2, width), np.int32)
    attention = np.zeros((local_pairs, 2, width), np.int32)
    completion = np.zeros((local_pairs, 2, width), np.int32)
    for b in range(first_block, first_block + local_blocks):
        d, a = divmod(b, n)
        global_pairs = plan.block_pairs(b)
        for r, row in enumerate(plan.block_rows[b]):
            local_row = (d - shard0) * n * r_blk + a + r * n
            at = (d * r_blk + r) * pack_length  # the row's start in micro-batch a, flattened
            col, seg = 0, 0
            for k in row:
                q = int(global_pairs[k]) - base_pair
                pair = pairs[q]
                assert pair is not None, "a padding pair has no tokens to pack"
                seqs, masks = formats.pair_sequences(*pair)
                p, c = len(pair[0]), len(seqs[0])
                chosen = col + np.arange(c)
                if shared:  # prompt | chosen | rejected: the rejected side reads the chosen side's prompt
                    spans = (chosen, np.concatenate([chosen[:p], col + c + np.arange(len(seqs[1]) - p)]))
                    segs, seg = (seg + 1, seg + 1), seg + 1
                else:
                    spans = (chosen, col + c + np.arange(len(seqs[1])))
                    segs, seg = (seg + 1, seg + 2), seg + 2
                for side in (0, 1):
                    cols, t = spans[side], len(seqs[side])
                    ids[local_row, cols] = seqs[side]
                    segments[local_row, cols] = segs[side]
                    positions[local_row, cols] = np.arange(t)
                    # each token is predicted from the one before it in its own sequence
                    sources[local_row, cols[1:]] = cols[:-1]
                    sources[local_row, cols[0]] = cols[0]  # nothing predicts a first token
                    if shared:
                        branches[local_row, cols[p:]] = side + 1
                    token_index[q, side, :t] = at + cols
                    attention[q, side, :t] = 1
                    completion[q, side, :t] = masks[side]
                col = int(max(spans[0][-1], spans[1][-1])) + 1
    completion[:, :, 0] = 0  # nothing predicts a sequence's first token
    pair_mask = np.array([p is not None for p in pairs], np.int32)
    return PackedBatch(ids, segments, positions, sources, token_index, attention, completion, pair_mask,
                       np.asarray(example_index, np.int32), branches if shared else None, layout)


@dataclass(frozen=True)
class RowSegment:
    """One segment of a packed row, read back from a `PackedBatch`: pair `pair` (a
    position of the batch's pairs; `example_index[pair]` is its row of the data) and its
    `spans`, `(kind, first column, tokens)` in column order, `kind` one of "prompt",
    "chosen", "rejected" (prompt + chosen or prompt + rejected; all three when shared)."""

    segment: int  # its segment id in the row
    pair: int
    spans: tuple[tuple[str, int, int], ...]

    @property
    def start(self) -> int:
        return self.spans[0][1]

    @property
    def length(self) -> int:
        return sum(n for _, _, n in self.spans)


def row_segments(batch: PackedBatch, row: int, micro: int) -> list[RowSegment]:
    """The segments of row `row` of `batch` (process 0's rows `[rows, pack]`, a step of
    `micro` micro-batches), in column order, found where `token_index` places each pair's
    sequences (the inverse of `collate_packed`, so a reader sees what the step computes).
    Process 0's: `token_index` counts the rows of a micro-batch over all the processes.

    A sequence's prompt is the run before its first loss-masked token; the loss mask is 0
    at a sequence's first token, so an empty prompt would show as one token."""
    pack = batch.input_ids.shape[1]
    at = (row // micro) * pack  # row `a + r*n` of the process is row r of micro-batch a
    spans: dict[int, dict[str, tuple[int, int]]] = {}
    pairs: dict[int, int] = {}
    for q in range(row % micro, len(batch.pair_mask), micro):  # micro-batch a's pairs: a, a+n, ...
        if not batch.pair_mask[q]:
            continue
        for side, answer in enumerate(("chosen", "rejected")):
            t = int(batch.attention_mask[q, side].sum())
            cols = batch.token_index[q, side, :t] - at
            if not 0 <= cols[-1] < pack:
                continue
            p = int(np.argmax(batch.loss_mask[q, side, :t]))
            seg = int(batch.segment_ids[row, cols[-1]])
            pairs[seg] = q
            spans.setdefault(seg, {})["prompt"] = (int(cols[0]), p)
            spans[seg][answer] = (int(cols[p]), t - p)
    out = [RowSegment(seg, pairs[seg], tuple(sorted(((k, *v) for k, v in s.items()), key=lambda x: x[1])))
           for seg, s in spans.items()]
    return sorted(out, key=lambda s: s.start)


def row_tokens(lengths: np.ndarray, shared: bool) -> np.ndarray:
    """Tokens `[rows]` a pair takes in a packed row from its `(p, c, r)` lengths `[rows,
    3]`: `2p + c + r`, or `p + c + r` with the prompt shared."""
    lengths = np.asarray(lengths, np.int64)
    return pair_tokens(lengths) - (lengths[:, 0] if shared else 0)


def pair_tokens(lengths: np.ndarray) -> np.ndarray:
    """Real tokens `[rows]` of each pair from its `(p, c, r)` lengths `[rows, 3]`: the
    prompt twice and both answers, `2p + c + r` (`mmpo_jax.data.batches.real_tokens`
    counts the same from a batch)."""
    lengths = np.asarray(lengths, np.int64)
    return 2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2]
