"""The segment-aware attention kernels on packed rows, against XLA attention with a dense
mask: numerics (forward and gradients) and the time of a forward + backward.

    python benchmarks/gpu_attention_check.py                      # on a GPU: pallas_gpu
    python benchmarks/gpu_attention_check.py --kernel splash      # on a TPU
    JAX_PLATFORMS=cpu python benchmarks/gpu_attention_check.py --smoke   # interpret mode

Rows of `--rows x --seq` tokens hold sequences of 64 to seq/2 tokens (seeded, as first-fit
leaves them: a few percent of padding at the end), in the Llama-3.2-1B attention shape (32
query heads on 8 kv heads of 64). The reference is the xla backend in float32; the kernel
and the xla backend both run in `--dtype` (bfloat16 by default), and the kernel passes when
its largest error against the float32 reference is within `--slack` times the xla
backend's own (plus 1e-5 of the reference's largest value for float32 runs). The time is the median of `--iters` synchronised
calls of a jitted forward + backward (a loss reading every output), each kernel against the
xla backend with the dense `[T, T]` segment mask, and against cuDNN's attention with no
segments (GPU only: the fused causal kernel's time on the same shape, a floor for ours).
Prints one JSON line; exit code 1 when the numerics fail. Imports neither grain nor
datasets (the GPU image has neither).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mmpo_jax.models.attention import MaskSpec, Segments, attention  # noqa: E402


def packed_segments(rows: int, seq: int, seed: int) -> np.ndarray:
    """`[rows, seq]` segment ids 1, 2, ... of sequences 64..seq/2 long, 0 for the padding
    left when the next sequence does not fit."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        at, s = 0, 1
        while True:
            n = int(rng.integers(64, max(65, seq // 2)))
            if at + n > seq:
                break
            seg[r, at:at + n], at, s = s, at + n, s + 1
    return seg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=("pallas_gpu", "splash"), default="pallas_gpu")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--slack", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-control", action="store_true",
                   help="run the kernel without the segment ids: its numerics must then fail (exit 1)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny shape in interpret mode, float32, 1 timed call (CPU: checks the script)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.seq, args.heads, args.kv_heads, args.head_dim = 2, 256, 4, 2, 32
        args.dtype, args.iters = "float32", 1
    backend = jax.default_backend()
    interpret = backend != {"pallas_gpu": "gpu", "splash": "tpu"}[args.kernel]
    if interpret and not args.smoke:
        p.error(f"--kernel {args.kernel} would run in interpret mode on {backend}: pass --smoke")

    seg = jnp.asarray(packed_segments(args.rows, args.seq, args.seed))
    packed = Segments(seg)
    keys = jax.random.split(jax.random.key(args.seed), 4)
    shape = (args.rows, args.seq)
    q32 = jax.random.normal(keys[0], (*shape, args.heads, args.head_dim), jnp.float32)
    k32, v32 = (jax.random.normal(kk, (*shape, args.kv_heads, args.head_dim), jnp.float32) for kk in keys[1:3])
    weights = jax.random.normal(keys[3], (args.head_dim,), jnp.float32)  # every output feature its own weight
    scale = args.head_dim ** -0.5
    dtype = jnp.dtype(args.dtype)

    def fwd_bwd(impl: str, segments: Segments | None):
        def loss(q, k, v):
            out = attention(q, k, v, MaskSpec(), scale=scale, implementation=impl,  # type: ignore[arg-type]
                            segments=segments, interpret=interpret and impl == args.kernel)
            real = (seg > 0)[:, :, None, None]  # padding queries are no one's output
            return jnp.sum(jnp.where(real, out.astype(jnp.float32) * weights, 0.0)), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    def outputs(impl: str, dt):
        segments = None if args.negative_control and impl == args.kernel else packed
        (_, out), grads = fwd_bwd(impl, segments)(q32.astype(dt), k32.astype(dt), v32.astype(dt))
        real = np.asarray(seg > 0)
        return [np.asarray(out, np.float32)[real], *(np.asarray(g, np.float32) for g in grads)]

    want = outputs("xla", jnp.float32)
    names = ("out", "dq", "dk", "dv")

    def errors(got):
        return {n: float(np.abs(g - w).max()) for n, g, w in zip(names, got, want)}

    kernel_err, xla_err = errors(outputs(args.kernel, dtype)), errors(outputs("xla", dtype))
    # float32: the xla backend is the reference itself (0 apart), so a relative floor
    floor = {n: 1e-5 * max(1.0, float(np.abs(w).max())) if dtype == jnp.float32 else 0.0
             for n, w in zip(names, want)}
    ok = all(kernel_err[n] <= args.slack * xla_err[n] + floor[n] for n in names)

    def timed(impl: str, segments: Segments | None) -> float:
        f = fwd_bwd(impl, segments)
        q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
        jax.block_until_ready(f(q, k, v))  # compile
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    ms = {f"{args.kernel}_ms": timed(args.kernel, packed), "xla_dense_mask_ms": timed("xla", packed)}
    if backend == "gpu" and dtype == jnp.bfloat16:  # cuDNN's kernel takes half precision
        ms["cudnn_no_segments_ms"] = timed("cudnn", None)
    print(json.dumps({"kernel": args.kernel, "backend": backend, "device": str(jax.devices()[0]),
                      "jax": jax.__version__, "shape": {"rows": args.rows, "seq": args.seq, "heads": args.heads,
                                                        "kv_heads": args.kv_heads, "head_dim": args.head_dim},
                      "dtype": args.dtype, "fill": float(np.mean(np.asarray(seg) > 0)),
                      "max_abs_err": {"kernel": kernel_err, "xla_same_dtype": xla_err}, "numerics_ok": ok,
                      **{k: round(v, 3) for k, v in ms.items()},
                      "speedup_vs_xla": round(ms["xla_dense_mask_ms"] / ms[f"{args.kernel}_ms"], 3)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
