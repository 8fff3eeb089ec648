"""Does a train step fit one device? XLA's compiled memory plan of the real step.

Builds our real MMPO train step (`mmpo_jax.train.step.make_train_step`: the jit with
its shardings and donation) for a model shape entirely abstractly (the state of
`mmpo_jax.train.setup.abstract_train_state`: a run's own init under `jax.eval_shape`, nothing
of model size allocated), compiles it with `.lower(abstract_state, abstract batch).compile()` and
prints XLA's `memory_analysis()`:

    total = arguments + outputs - aliased (donated) + temporaries

against the device's memory, as one JSON object and one summary line. With
`--run-steps N` (and time left before `--deadline-s`) it then builds the real state
(random weights), runs the same compiled executable N steps and reports the measured
peak (`memory_stats()['peak_bytes_in_use']`) and the step time.

The default is the issue's target: Llama-3-8B (vocab 128256, hidden 4096, MLP 14336,
32 layers, 32 heads, 8 KV heads, head_dim 128, rope_theta 500000, untied embeddings)
with LoRA rank 64, alpha 64 on q,k,v,o, frozen bfloat16 base weights, bfloat16
compute, remat full, reference `lora_base` (the base weights, no copy), seq 2048,
8 pairs (16 sequences) per step, LM-head chunk 256:

    PYTHONPATH=. python benchmarks/memory_fit.py --json-out /tmp/fit.json
    # CPU, tiny (seconds): the same code path
    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/memory_fit.py --model tiny --seq 64 --pairs 2

On a CPU the numbers are the CPU compile's plan (XLA attention materialises the
`[B, H, T, T]` scores; on a GPU, cuDNN flash attention does not): informative, but
say it is a CPU plan. "Fits an 80 GB card" is judged against an H100 80GB's 81559 MiB
times `--headroom` (default 0.9: CUDA context, cuBLAS/cuDNN workspaces and
fragmentation are outside XLA's plan). Imports no grain, datasets or mmpo_jax.data but the
batch layout (`mmpo_jax.data.layout`, numpy and jax only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30
# An H100 80GB HBM3 as nvidia-smi reports it (81559 MiB), the "80 GB GPU" of the target.
CARD_80GB_BYTES = 81559 * 2**20

# name: DecoderConfig fields (transformers' names)
MODELS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, rope_theta=500000.0, tie_word_embeddings=False,
                      rms_norm_eps=1e-5),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                        rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


def resolve_compute_dtype(name: str, backend: str) -> str:
    if name != "auto":
        return name
    return "float32" if backend == "cpu" else "bfloat16"


def tree_bytes(tree: Any) -> int:
    import jax

    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def tree_count(tree: Any) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def memory_plan(compiled: Any) -> dict:
    """Every `*_in_bytes` field of XLA's memory analysis, plus the total."""
    stats = compiled.memory_analysis()
    out: dict[str, Any] = {}
    if stats is None:
        return {"available": False}
    for name in dir(stats):
        if name.endswith("_in_bytes"):
            value = getattr(stats, name)
            if isinstance(value, int):
                out[name.removesuffix("_size_in_bytes").removesuffix("_in_bytes") + "_bytes"] = value
    a, o = out.get("argument_bytes", 0), out.get("output_bytes", 0)
    al, t = out.get("alias_bytes", 0), out.get("temp_bytes", 0)
    out["total_bytes"] = a + o - al + t
    return out


def build(args: argparse.Namespace) -> dict:
    """The abstract state and batch, the jitted step and everything needed to run it."""
    import jax

    from mmpo_jax.config_schema import LossConfig, MeshConfig, OptimConfig
    from mmpo_jax.config_settle import settle_loss
    from mmpo_jax.data.layout import PADDED
    from mmpo_jax.train.reference import reference_mode
    from mmpo_jax.train.setup import abstract_train_state
    from mmpo_jax.models.decoder_config import DecoderConfig
    from mmpo_jax.models.options import LoraOptions, ModelOptions
    from mmpo_jax.sharding import make_mesh
    from mmpo_jax.train.optim import learning_rate_schedule, make_optimizer
    from mmpo_jax.train.state import state_shardings
    from mmpo_jax.train.step import StepConfig, make_train_step

    backend = jax.default_backend()
    cfg = DecoderConfig(**MODELS[args.model], max_position_embeddings=max(8192, args.seq))
    lora = args.lora_rank > 0
    options = ModelOptions(
        param_dtype=args.param_dtype,
        compute_dtype=resolve_compute_dtype(args.compute_dtype, backend),
        attention=args.attention, scan_layers=True, remat=args.remat,
        lora=LoraOptions(rank=args.lora_rank, alpha=args.lora_alpha, dropout=0.0,
                         targets=tuple(args.lora_targets)) if lora else None,
    )
    # One device: the single-GPU question.
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    total_steps = 1000
    optim_cfg = OptimConfig(learning_rate=args.lr, schedule="constant", mu_dtype=args.mu_dtype)
    optim_cfg.validate("optim")
    loss_cfg = settle_loss(LossConfig(name="mmpo"))
    loss_cfg.validate("loss")
    optimizer = make_optimizer(optim_cfg, total_steps)
    scfg = StepConfig(loss=loss_cfg, grad_accum=1, logprob_chunk=args.logprob_chunk,
                      schedule=learning_rate_schedule(optim_cfg, total_steps), dropout=False)

    t0 = time.perf_counter()
    # the state `mmpo-jax aot-check` compiles: the run's own init under jax.eval_shape
    mode = reference_mode(args.reference)
    sdef, abstract = abstract_train_state(cfg, options, optimizer, mesh, reference_mode=mode)
    batch = PADDED.abstract(args.pairs, args.seq, mesh, mode)
    step = make_train_step(sdef, scfg, optimizer, mesh, state_shardings(abstract), batch)
    abstract_s = time.perf_counter() - t0
    return dict(cfg=cfg, options=options, mesh=mesh, optimizer=optimizer, abstract=abstract,
                batch=batch, step=step, abstract_s=abstract_s, backend=backend, lora=lora)


def compile_plan(args: argparse.Namespace) -> tuple[dict, dict]:
    """`(result, built)`: the memory plan of the compiled step for `args`."""
    import jax
    import numpy as np

    b = build(args)
    t0 = time.perf_counter()
    lowered = b["step"].lower(b["abstract"], b["batch"])
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    b["compiled"] = compiled
    plan = memory_plan(compiled)
    st = b["abstract"]
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    limit = stats.get("bytes_limit")
    total = plan.get("total_bytes")
    budget = CARD_80GB_BYTES * args.headroom
    options = b["options"]
    result = {
        "model": args.model, "seq": args.seq, "pairs": args.pairs,
        "sequences_per_step": 2 * args.pairs, "tokens_per_step": 2 * args.pairs * args.seq,
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets}
        if b["lora"] else None,
        "reference": args.reference, "remat": options.remat,
        "param_dtype": np.dtype(options.param_dtype).name,
        "compute_dtype": np.dtype(options.compute_dtype).name,
        "attention_impl": options.model_choice(b["cfg"]).kernel,
        "logprob_chunk": args.logprob_chunk, "mu_dtype": args.mu_dtype,
        "params": {
            "trainable": tree_count(st.trainable), "frozen": tree_count(st.frozen),
            "reference": tree_count(st.reference) if st.reference is not None else 0,
        },
        "state_bytes": {
            "trainable": tree_bytes(st.trainable), "frozen": tree_bytes(st.frozen),
            "rest": tree_bytes(st.rest),
            "reference": tree_bytes(st.reference) if st.reference is not None else 0,
            "opt_state": tree_bytes(st.opt_state), "total": tree_bytes(st),
        },
        "xla_memory": plan,
        "total_gib": None if total is None else total / GIB,
        "device": {"backend": b["backend"], "kind": dev.device_kind,
                   "bytes_limit": limit, "bytes_limit_gib": None if limit is None else limit / GIB},
        "card_80gb_bytes": CARD_80GB_BYTES, "headroom": args.headroom,
        "fits_80gb_card": None if total is None else bool(total <= budget),
        "fits_this_device": None if (total is None or limit is None) else bool(total <= limit),
        "abstract_build_s": b["abstract_s"], "lower_s": lower_s, "compile_s": compile_s,
        "jax": jax.__version__, "source": "compiled memory analysis (XLA plan, not a run)",
        "forbidden_modules": sorted(m for m in sys.modules
                                    if m.split(".")[0] in ("grain", "datasets")
                                    or (m.startswith("mmpo_jax.data")
                                        and m not in ("mmpo_jax.data", "mmpo_jax.data.layout"))),
    }
    return result, b


def run_steps(args: argparse.Namespace, b: dict, steps: int, warmup: int) -> dict:
    """Real weights (random), the same compiled executable, `warmup + steps` steps."""
    import jax
    import numpy as np

    from mmpo_jax.data.layout import DeviceBatch, batch_shardings
    from mmpo_jax.models.build import build_model
    from mmpo_jax.train.reference import reference_mode
    from mmpo_jax.train.state import create_state, state_shardings

    t0 = time.perf_counter()
    model = build_model(b["cfg"], b["options"], mesh=b["mesh"], seed=0)
    _, state = create_state(model, b["optimizer"], lora=b["lora"], reference_mode=reference_mode(args.reference),
                            seed=0, mesh=b["mesh"])
    del model
    # onto exactly the shardings the executable was compiled for
    state = jax.device_put(state, state_shardings(b["abstract"]))
    rng = np.random.default_rng(1)
    vocab = b["cfg"].vocab_size
    ids = rng.integers(0, vocab, (args.pairs, 2, args.seq), dtype=np.int32)
    mask = np.ones_like(ids)
    mask[:, :, : args.seq // 4] = 0
    host = DeviceBatch(input_ids=ids, loss_mask=mask, pair_mask=np.ones(args.pairs, np.int32))
    batch = jax.device_put(host, batch_shardings(b["mesh"], host))
    jax.block_until_ready((state, batch))
    build_s = time.perf_counter() - t0
    times, metrics = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = b["compiled"](state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    med = float(np.median(times)) if times else None
    tokens = 2 * args.pairs * args.seq
    return {
        "steps": steps, "warmup": warmup, "build_s": build_s, "step_s_all": times,
        "step_s_median": med, "tokens_per_s": tokens / med if med else None,
        "loss": float(metrics["loss"]), "nonfinite": float(metrics["nonfinite"]),
        "peak_bytes_in_use": peak, "peak_gib": None if peak is None else peak / GIB,
        "source": "measured: memory_stats()['peak_bytes_in_use'] since process start",
    }


def summary_line(r: dict) -> str:
    x = r["xla_memory"]
    g = lambda k: x.get(k, 0) / GIB  # noqa: E731
    lora = f"LoRA r{r['lora']['rank']} {','.join(r['lora']['targets'])}" if r["lora"] else "full FT"
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "?"}[r["fits_80gb_card"]]
    line = (f"{r['model']} {lora} {r['param_dtype']} params, remat {r['remat']}, ref {r['reference']}, "
            f"seq {r['seq']} x {r['sequences_per_step']} seqs, chunk {r['logprob_chunk']}, "
            f"{r['attention_impl']} attention on {r['device']['kind']}: args {g('argument_bytes'):.2f} + "
            f"out {g('output_bytes'):.2f} - alias {g('alias_bytes'):.2f} + temp {g('temp_bytes'):.2f} "
            f"= {r['total_gib']:.2f} GiB (XLA plan; compile {r['compile_s']:.1f} s); "
            f"80 GB card x{r['headroom']}: {CARD_80GB_BYTES * r['headroom'] / GIB:.1f} GiB -> {verdict}")
    if r["device"]["bytes_limit_gib"] is not None:
        line += f"; this device's XLA limit {r['device']['bytes_limit_gib']:.1f} GiB"
    run = r.get("run")
    if run and run.get("status") == "ok":
        peak = "n/a" if run["peak_gib"] is None else f"{run['peak_gib']:.2f} GiB"
        line += (f"; RUN: peak {peak} measured, step {run['step_s_median']:.3f} s, "
                 f"{run['tokens_per_s']:,.0f} tok/s, loss {run['loss']:.4f}")
    elif run:
        line += f"; RUN {run.get('status')}: {str(run.get('error'))[:200]}"
    return line


def write_json(path: str | None, payload: Any) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="llama3-8b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x sequences)")
    p.add_argument("--fallback-pairs", type=int, default=4,
                   help="also compile with this many pairs if --pairs does not fit (0 = never)")
    p.add_argument("--lora-rank", type=int, default=64, help="0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=64.0)
    p.add_argument("--lora-targets", type=lambda s: [t for t in s.split(",") if t],
                   default=["q", "k", "v", "o"])
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default="bfloat16")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto")
    p.add_argument("--remat", choices=["none", "full", "dots"], default="full")
    p.add_argument("--reference", choices=["lora_base", "separate"], default="lora_base")
    p.add_argument("--logprob-chunk", type=lambda s: None if s.lower() in ("none", "0") else int(s),
                   default=256)
    p.add_argument("--mu-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--headroom", type=float, default=0.9,
                   help="fraction of the 80 GB card XLA's plan may use")
    p.add_argument("--run-steps", type=int, default=0,
                   help="after the plan, run this many timed steps on real (random) weights")
    p.add_argument("--run-warmup", type=int, default=1)
    p.add_argument("--run-min-s", type=float, default=60.0,
                   help="run only with at least this many seconds left before --deadline-s")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="seconds from start this script must finish by (0 = no limit)")
    p.add_argument("--json-out", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.lora_rank == 0 and args.reference == "lora_base":
        args.reference = "separate"
    started = time.perf_counter()
    payload: dict[str, Any] = {"args": vars(args), "plans": []}
    result, built = compile_plan(args)
    payload["plans"].append(result)
    write_json(args.json_out, payload)
    print("MEMORY_FIT " + json.dumps(result, default=str), flush=True)
    print(summary_line(result), flush=True)
    chosen, chosen_built = result, built
    if result["fits_80gb_card"] is False and args.fallback_pairs and args.fallback_pairs != args.pairs:
        small = argparse.Namespace(**{**vars(args), "pairs": args.fallback_pairs})
        result2, built2 = compile_plan(small)
        payload["plans"].append(result2)
        write_json(args.json_out, payload)
        print("MEMORY_FIT " + json.dumps(result2, default=str), flush=True)
        print(summary_line(result2), flush=True)
        if result2["fits_80gb_card"]:
            chosen, chosen_built, args = result2, built2, small
    if args.run_steps > 0:
        left = (args.deadline_s - (time.perf_counter() - started)) if args.deadline_s else math.inf
        limit = chosen["device"]["bytes_limit"]
        if left < args.run_min_s:
            chosen["run"] = {"status": "skipped", "error": f"{left:.0f} s left < {args.run_min_s:.0f} s"}
        elif limit is not None and chosen["xla_memory"]["total_bytes"] > limit:
            chosen["run"] = {"status": "skipped", "error": "the plan exceeds this device's limit"}
        else:
            try:
                chosen["run"] = {"status": "ok", **run_steps(args, chosen_built, args.run_steps,
                                                              args.run_warmup)}
            except Exception as e:  # OOM etc.: keep the plan
                chosen["run"] = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:1500]}"}
        write_json(args.json_out, payload)
        print("MEMORY_FIT_RUN " + json.dumps(chosen["run"], default=str), flush=True)
        print(summary_line(chosen), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
