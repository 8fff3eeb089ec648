"""Temporary memory of forward+backward of the sequence log-prob: naive vs chunked.

From XLA's compiled memory analysis (`jit(...).lower(...).compile().memory_analysis()`)
of `grad(sum of sequence_logps)` w.r.t. the hidden states and the LM head kernel, for
abstract inputs (`jax.ShapeDtypeStruct`: nothing of that size is allocated). The
default shapes are Llama-3.2-1B's head: batch 8, seq 2048, hidden 2048, vocab 128256.
Prints one JSON object:

    {"naive_temp_bytes": ..., "chunked_temp_bytes": ..., "ratio": chunked / naive, ...}

    python benchmarks/logprob_memory.py [--batch 8 --seq 2048 --hidden 2048
        --vocab 128256 --chunk 256 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Compile for the host CPU by default (the analysis is about the program, not a device).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mmpo_jax.logprobs import (  # noqa: E402
    DEFAULT_CHUNK,
    sequence_logps,
    token_logps_chunked,
    token_logps_naive,
)


def temp_bytes(
    chunk: int | None,
    *,
    batch: int,
    seq: int,
    hidden: int,
    vocab: int,
    dtype: str = "bfloat16",
) -> dict:
    """Compiled memory figures of grad(sum(sequence_logps)) for the naive path
    (`chunk=None`) or the chunked one."""
    dt = jnp.dtype(dtype)
    h = jax.ShapeDtypeStruct((batch, seq, hidden), dt)
    w = jax.ShapeDtypeStruct((hidden, vocab), dt)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq), jnp.float32)

    def loss(h, w, ids, mask):
        if chunk is None:
            lp = token_logps_naive(h, w, ids)
        else:
            lp = token_logps_chunked(h, w, ids, chunk=chunk)
        return jnp.sum(sequence_logps(lp, mask, average=False))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    stats = fn.lower(h, w, ids, mask).compile().memory_analysis()
    return {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    shape = dict(batch=args.batch, seq=args.seq, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype)
    naive = temp_bytes(None, **shape)
    chunked = temp_bytes(args.chunk, **shape)
    out = {
        "naive_temp_bytes": naive["temp"],
        "chunked_temp_bytes": chunked["temp"],
        "ratio": chunked["temp"] / naive["temp"],
        "shape": shape,
        "chunk": args.chunk,
        "backend": jax.default_backend(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
