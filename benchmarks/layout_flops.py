"""Compute per pair of `data.packing: none` against `packed` and `shared_prompt`, from
XLA's own FLOP count.

For a model shape (default: Llama-3.2-1B) it builds our real train step (MMPO, full
fine-tuning, reference `separate`) entirely abstractly (`abstract_train_state`: nothing
of model size allocated), lowers it for each batch shape the length sample needs and
reads `Lowered.cost_analysis()["flops"]` (no XLA compile). XLA's cost analysis counts a
loop body once, so the step is built with unscanned layers, one LM-head chunk at least
as long as a row (`--logprob-chunk`, default the pack length) and `grad_accum=1`.

Batches are `--batch` consecutive pairs in file order over the first `--pairs` pairs
of `--lengths` (JSON lines of untruncated `prompt`, `chosen`, `rejected` token counts),
truncated as the data pipeline truncates (`data.max_length`, `data.max_prompt_length`),
and laid out as a run lays them out: `none` pads every sequence of a batch to its bucket
(`mmpo_jax.data.batches`), `packed` packs a batch's pairs into rows of `--pack-length`
(`mmpo_jax.data.packing`, one device, one micro-batch), `shared_prompt` the same with
each pair one sequence `p + c + r` long (XLA attention: one dense call under the
branched mask; the Pallas kernels: two segment calls,
`mmpo_jax.models.attention.branched_segments`).

It checks the `none` count against the analytic count of the step's matmuls (within
5%), and reports attention FLOPs two ways: as XLA counts them (dense `[T, T]` scores per
row, what `jax.nn.dot_product_attention`'s XLA path computes) and segment-aware (only
the `[s, s]` blocks of each sequence's own tokens, what a kernel that skips other
segments' blocks computes; for shared_prompt the blocks of both calls). The last line
is one JSON object: `{"none_flops_per_pair", "packed_flops_per_pair", "ratio",
"shared_prompt_flops_per_pair", "shared_prompt_ratio", ...}` (ratios over none, all with
XLA's dense attention count) plus computed tokens per real token for each.

    JAX_PLATFORMS=cpu python benchmarks/layout_flops.py \
        --lengths ../shared/bench/lengths_ultrafeedback_like.jsonl
    # tiny shape (seconds), the same code path:
    JAX_PLATFORMS=cpu python benchmarks/layout_flops.py --lengths FILE --model tiny \
        --max-length 64 --max-prompt-length 32 --pairs 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_fit import MODELS  # noqa: E402  (the model shapes, one table for the benchmarks)


def read_lengths(path: str, pairs: int, max_length: int, max_prompt_length: int | None) -> np.ndarray:
    """`[pairs, 3]` truncated `(p, c, r)` of the first `pairs` rows of `path`."""
    from mmpo_jax.data.formats import truncated_lengths

    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append((row["prompt"], row["chosen"], row["rejected"]))
            if len(rows) == pairs:
                break
    if len(rows) < pairs:
        raise SystemExit(f"{path} holds {len(rows)} pairs, fewer than --pairs {pairs}")
    raw = np.asarray(rows, np.int64)
    p, c, r = truncated_lengths(raw[:, 0], raw[:, 1], raw[:, 2], max_length, max_prompt_length)
    kept = (c > 0) & (r > 0)  # the pipeline drops a pair with an empty answer
    return np.stack([p, c, r], axis=1)[kept]


def layouts(lengths: np.ndarray, batch: int, max_length: int, pack_length: int) -> list[dict]:
    """Per batch: its `none` bucket, its `packed` and `shared_prompt` row counts, real
    tokens, the sequences' lengths and the shared layout's attention segments (both
    calls: prompt + chosen and the rejected answer alone, prompt + rejected and the
    chosen answer alone), for the attention counts."""
    from mmpo_jax.buckets import bucket_for, bucket_lengths
    from mmpo_jax.data.batches import SMALLEST_BUCKET
    from mmpo_jax.data.packing import pack_plan, pair_tokens, row_tokens

    buckets = bucket_lengths(max_length, SMALLEST_BUCKET)
    out = []
    for start in range(0, len(lengths) - batch + 1, batch):
        part = lengths[start:start + batch]
        seqs = np.concatenate([part[:, 0] + part[:, 1], part[:, 0] + part[:, 2]])
        plan = pack_plan(pair_tokens(part), shards=1, micro=1, pack_length=pack_length)
        shared = pack_plan(row_tokens(part, True), shards=1, micro=1, pack_length=pack_length)
        out.append(dict(bucket=bucket_for(int(seqs.max()), buckets), rows=plan.rows, shared_rows=shared.rows,
                        real=int(pair_tokens(part).sum()), seqs=seqs,
                        shared_segments=np.concatenate([seqs, part[:, 1], part[:, 2]])))
    return out


def analytic_flops(arch: dict, rows: int, seq: int, tokens_attended: int) -> dict[str, float]:
    """The step's matmul FLOPs: policy forward + backward (3 passes of the layers; the
    chunked LM head 4: forward, recomputed logits, two gradients), reference forward
    (1 pass each). `tokens_attended`: sum over rows (or segments) of length^2."""
    d, m, v = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"]
    h, kv, hd = arch["num_attention_heads"], arch["num_key_value_heads"], arch.get("head_dim") or d // arch["num_attention_heads"]
    layers = arch["num_hidden_layers"]
    per_token_layer = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * m)
    tokens = rows * seq
    dense = 4 * layers * (4 * h * hd) * tokens_attended  # QK^T and PV, 4 passes
    return {"matmul": tokens * (4 * layers * per_token_layer + 5 * 2 * d * v), "attention": float(dense)}


def lowered_flops(step, state, batch) -> float:
    cost = step.lower(state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--model", default="llama3.2-1b", choices=sorted(MODELS))
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--pack-length", type=int, default=None, help="default 2 x --max-length")
    ap.add_argument("--logprob-chunk", type=int, default=None, help="default --pack-length")
    ap.add_argument("--compute-dtype", default="bfloat16")
    args = ap.parse_args(argv)
    pack = args.pack_length or 2 * args.max_length
    chunk = args.logprob_chunk or pack
    if chunk < pack:
        ap.error(f"--logprob-chunk {chunk} < --pack-length {pack}: XLA would count one LM-head chunk only")

    import jax

    from mmpo_jax.config_schema import LossConfig, MeshConfig, OptimConfig
    from mmpo_jax.config_settle import settle_loss
    from mmpo_jax.models.decoder_config import DecoderConfig
    from mmpo_jax.models.options import ModelOptions
    from mmpo_jax.sharding import make_mesh
    from mmpo_jax.train.optim import learning_rate_schedule, make_optimizer
    from mmpo_jax.data.layout import layout_of
    from mmpo_jax.train.reference import reference_mode
    from mmpo_jax.train.setup import abstract_train_state
    from mmpo_jax.train.state import state_shardings
    from mmpo_jax.train.step import StepConfig, make_train_step

    lengths = read_lengths(args.lengths, args.pairs, args.max_length, args.max_prompt_length)
    plan = layouts(lengths, args.batch, args.max_length, pack)
    arch = MODELS[args.model]
    cfg = DecoderConfig(**arch, max_position_embeddings=max(8192, pack))
    options = ModelOptions(param_dtype="bfloat16", compute_dtype=args.compute_dtype, attention="xla",
                           scan_layers=False, remat="none")
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    optim_cfg = OptimConfig(learning_rate=1e-6, schedule="constant")
    optimizer = make_optimizer(optim_cfg, 1000)
    scfg = StepConfig(loss=settle_loss(LossConfig(name="mmpo")), grad_accum=1, logprob_chunk=chunk,
                      schedule=learning_rate_schedule(optim_cfg, 1000), dropout=False)
    separate = reference_mode("separate")
    sdef, state = abstract_train_state(cfg, options, optimizer, mesh, reference_mode=separate)

    cache: dict[tuple, float] = {}

    def flops(key: tuple) -> float:
        if key not in cache:
            t0 = time.perf_counter()
            layout = layout_of(key[0])
            if layout.segments:
                batch = layout.abstract(args.batch, args.max_length, mesh, separate, rows=(key[1], pack))
            else:
                batch = layout.abstract(args.batch, key[1], mesh, separate)
            step = make_train_step(sdef, scfg, optimizer, mesh, state_shardings(state), batch)
            cache[key] = lowered_flops(step, state, batch)
            print(f"  lowered {key[0]} {key[1]}: {cache[key]:.4g} FLOPs ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
        return cache[key]

    total = {"none": 0.0, "packed": 0.0, "shared": 0.0, "none_tokens": 0, "packed_tokens": 0,
             "shared_tokens": 0, "real": 0, "none_dense_attention": 0.0, "packed_dense_attention": 0.0,
             "shared_dense_attention": 0.0, "segment_attention": 0.0, "shared_segment_attention": 0.0,
             "none_analytic": 0.0}
    for b in plan:
        rows_none = 2 * args.batch
        total["none"] += flops(("none", b["bucket"]))
        total["packed"] += flops(("packed", b["rows"]))
        total["shared"] += flops(("shared_prompt", b["shared_rows"]))
        total["shared_tokens"] += b["shared_rows"] * pack
        total["none_tokens"] += rows_none * b["bucket"]
        total["packed_tokens"] += b["rows"] * pack
        total["real"] += b["real"]
        a_none = analytic_flops(arch, rows_none, b["bucket"], rows_none * b["bucket"] ** 2)
        total["none_analytic"] += a_none["matmul"] + a_none["attention"]
        total["none_dense_attention"] += a_none["attention"]
        total["packed_dense_attention"] += analytic_flops(arch, b["rows"], pack, b["rows"] * pack**2)["attention"]
        total["segment_attention"] += analytic_flops(arch, 0, 0, int((b["seqs"] ** 2).sum()))["attention"]
        # XLA: one dense call with both views' mask; the segment-aware count is the Pallas
        # kernels' two segment calls (prompt + chosen with the rejected answer alone, and
        # prompt + rejected with the chosen answer alone)
        total["shared_dense_attention"] += analytic_flops(arch, b["shared_rows"], pack,
                                                          b["shared_rows"] * pack**2)["attention"]
        total["shared_segment_attention"] += analytic_flops(
            arch, 0, 0, int((b["shared_segments"] ** 2).sum()))["attention"]
    pairs = len(plan) * args.batch
    off = total["none"] / total["none_analytic"] - 1
    ok = abs(off) <= 0.05
    print(f"none: XLA counts {total['none']:.4g} FLOPs, the analytic count {total['none_analytic']:.4g} "
          f"({off:+.1%}{'' if ok else ': MORE THAN 5% OFF'})", file=sys.stderr)
    segment_none = total["none"] - total["none_dense_attention"] + total["segment_attention"]
    segment_packed = total["packed"] - total["packed_dense_attention"] + total["segment_attention"]
    segment_shared = total["shared"] - total["shared_dense_attention"] + total["shared_segment_attention"]
    result = {
        "model": args.model, "pairs": pairs, "batch": args.batch, "max_length": args.max_length,
        "pack_length": pack, "shapes": {"none": sorted({b["bucket"] for b in plan}),
                                        "packed_rows": sorted({b["rows"] for b in plan}),
                                        "shared_prompt_rows": sorted({b["shared_rows"] for b in plan})},
        "none_flops_per_pair": total["none"] / pairs,
        "packed_flops_per_pair": total["packed"] / pairs,
        "ratio": total["packed"] / total["none"],
        "none_computed_per_real_token": total["none_tokens"] / total["real"],
        "packed_computed_per_real_token": total["packed_tokens"] / total["real"],
        "shared_prompt_flops_per_pair": total["shared"] / pairs,
        "shared_prompt_ratio": total["shared"] / total["none"],
        "shared_prompt_computed_per_real_token": total["shared_tokens"] / total["real"],
        "attention_flops_per_pair": {
            "none_dense": total["none_dense_attention"] / pairs,
            "packed_dense": total["packed_dense_attention"] / pairs,
            "segment_aware": total["segment_attention"] / pairs,
            "shared_prompt_dense": total["shared_dense_attention"] / pairs,
            "shared_prompt_segment_aware": total["shared_segment_attention"] / pairs,
        },
        "segment_aware_ratio": segment_packed / segment_none,
        "shared_prompt_segment_aware_ratio": segment_shared / segment_none,
        "none_vs_analytic": off,
    }
    print(json.dumps(result))
    if not ok:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
