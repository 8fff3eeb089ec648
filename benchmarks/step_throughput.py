"""Throughput of our jitted MMPO train step against the PyTorch/TRL-style peer.

Times the real `mmpo_jax.train.step.make_train_step` step (random weights of the
real shapes, `model.reference: separate`, synthetic token batches) and, in the
same invocation, the peer `benchmarks/peer/torch_peer_step.py` on the same
shapes (eager, `torch.compile`, or both). Prints one table at the end:

    model  seq  pairs  ours  peer  ours tok/s  peer tok/s  ratio  TFLOP/s  MFU  ours GiB  peer GiB

Method (see benchmarks/NOTES.md):

- tokens per step = 2 * pairs * seq, model FLOPs per step =
  `param_flops_per_token * tokens * 4` (policy forward + backward = 3x, reference
  forward = 1x): the peer's own definitions, read from its file, so ratios are
  like for like and the shapes (`SHAPES`) cannot drift.
- batch: random token ids, loss mask 0 on the first seq // 4 tokens (the peer's).
- timing: warm-up steps excluded, then the median of `--steps` steps, each ended
  by `jax.block_until_ready` on the new state and metrics (the peer syncs CUDA).
- every measurement (the matmul peak, each of our variants, each peer mode) runs
  in its own subprocess: clean peak memory, no JAX preallocation starving torch,
  and a crash, OOM or hang becomes an error row while the rest goes on. Each job
  gets `--timeout-s`, capped by what is left of `--budget-s`.
- MFU = model TFLOP/s over a bf16 matmul peak measured in the same run
  (8192^2 in JAX on a GPU; float32 1024^2 on a CPU, which is only a smoke test).
- our peak device memory: `memory_stats()['peak_bytes_in_use']` since the process
  started (init included; the step's peak dominates it); the peer's:
  `torch.cuda.max_memory_allocated` over its timed steps. Also reported: compile
  time and XLA's `memory_analysis()` of the compiled step (argument/temp bytes).

Run from the checkout (no grain, datasets or mmpo_jax.data is imported):

    PYTHONPATH=. python benchmarks/step_throughput.py \\
        --models smollm2-135m,smollm2-360m,llama3.2-1b --seq 1024 --pairs 8 \\
        --peer both --variants remat=none remat=dots --json-out $OUT/step_throughput.json

    # CPU smoke test
    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/step_throughput.py \\
        --models tiny --seq 64 --pairs 2 --steps 3 --warmup 1 --peer eager
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PEER_FILE = REPO / "benchmarks" / "peer" / "torch_peer_step.py"
RESULT_TAG = "@@STEP_BENCH_RESULT@@ "
# Workers mark their progress, so a job killed by its timeout says where it was.
STAGE_TAG = "@@STEP_BENCH_STAGE@@ "
# Our process must run on the GPU image, which has none of these.
FORBIDDEN_PREFIXES = ("grain", "datasets", "mmpo_jax.data")
# of those, the step's own batch layout (numpy and jax only) and its package
STEP_MODULES = ("mmpo_jax.data", "mmpo_jax.data.layout")
GIB = 2**30

if str(REPO) not in sys.path:  # run as `python benchmarks/step_throughput.py` from a checkout
    sys.path.insert(0, str(REPO))
from mmpo_jax.config_schema import ModelConfig, OptimConfig# noqa: E402  (imports neither jax nor the data)

# Keys a variant may set (`--variants remat=dots,logprob_chunk=512`), with parsers.
VARIANT_KEYS: dict[str, Callable[[str], Any]] = {
    "remat": str,
    "attention": str,
    "param_dtype": str,
    "compute_dtype": str,
    "logprob_chunk": lambda s: None if s.lower() in ("none", "0") else int(s),
    "grad_accum": int,
    "scan_layers": lambda s: s.lower() in ("1", "true", "yes"),
    "mu_dtype": str,
}


# --------------------------------------------------------------------------- #
# The peer's definitions, without importing torch
# --------------------------------------------------------------------------- #
def load_peer_definitions(path: Path) -> tuple[dict[str, tuple], Callable[[Any], int]]:
    """`SHAPES` and `param_flops_per_token` from the peer's source.

    Read with `ast` instead of imported: importing the peer loads torch and
    transformers, which our JAX process (and the parent) must not carry.
    `SHAPES`: name -> (layers, hidden, heads, kv_heads, ffn, vocab, tied).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    shapes, func = None, None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "SHAPES" for t in node.targets
        ):
            shapes = ast.literal_eval(node.value)
        if isinstance(node, ast.FunctionDef) and node.name == "param_flops_per_token":
            namespace: dict[str, Any] = {}
            exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
            func = namespace["param_flops_per_token"]
    if shapes is None or func is None:
        raise RuntimeError(f"{path}: SHAPES or param_flops_per_token not found")
    return shapes, func


SHAPES, _PEER_FLOPS_PER_TOKEN = load_peer_definitions(PEER_FILE)


def shape_namespace(name: str) -> types.SimpleNamespace:
    """The model's shape with transformers' attribute names (what both
    `param_flops_per_token` and our `DecoderConfig` read)."""
    layers, hidden, heads, kv, ffn, vocab, tied = SHAPES[name]
    return types.SimpleNamespace(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab, tie_word_embeddings=tied,
    )


def step_tokens(pairs: int, seq: int) -> int:
    """Tokens per step, chosen and rejected counted (the peer's `n * seq`)."""
    return 2 * pairs * seq


def step_flops(model: str, seq: int, pairs: int) -> float:
    """Model FLOPs per step: weight matmuls only, policy fwd+bwd (3x) + reference fwd (1x)."""
    return float(_PEER_FLOPS_PER_TOKEN(shape_namespace(model)) * step_tokens(pairs, seq) * 4)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def mark_stage(name: str) -> None:
    """Tells the parent (through stdout) which stage this worker has reached."""
    print(f"{STAGE_TAG}{name}", flush=True)


def forbidden_modules() -> list[str]:
    """Modules of `FORBIDDEN_PREFIXES` loaded in this process (but `STEP_MODULES`)."""
    return sorted(
        m for m in sys.modules
        if m not in STEP_MODULES and any(m == p or m.startswith(p + ".") for p in FORBIDDEN_PREFIXES)
    )


def host_peak_rss_gib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# --------------------------------------------------------------------------- #
# Worker: the matmul peak
# --------------------------------------------------------------------------- #
def worker_peak(job: dict) -> dict:
    """Matmul rate in TFLOP/s: the median of `trials` batches of `reps` products.

    bf16 8192^2 on an accelerator. On a CPU bf16 is emulated and 8192^2 takes
    minutes, so float32 1024^2: a smoke-test number, labelled as such.
    """
    import jax
    import jax.numpy as jnp

    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    n = job["size"] or (1024 if on_cpu else 8192)
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    reps, trials = (3, 3) if on_cpu else (20, 5)
    ka, kb = jax.random.split(jax.random.key(0))
    # random operands: zeros can run faster than real data
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready([matmul(a, b) for _ in range(3)])  # compile + warm-up
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready([matmul(a, b) for _ in range(reps)])
        rates.append(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12)
    dev = jax.devices()[0]
    return {
        "tflops": median(rates), "size": n, "dtype": jnp.dtype(dtype).name, "backend": backend,
        "device_kind": dev.device_kind, "device_count": jax.device_count(),
        "jax": jax.__version__, "python": sys.version.split()[0],
    }


# --------------------------------------------------------------------------- #
# Worker: our train step
# --------------------------------------------------------------------------- #
def synthetic_batch(pairs: int, seq: int, vocab: int, seed: int = 1) -> Any:
    """Pair-major `DeviceBatch` of numpy arrays: `input_ids`/`loss_mask` int32 [pairs, 2,
    seq], `pair_mask` int32 [pairs]; the first seq // 4 tokens are prompt (mask 0)."""
    import numpy as np

    from mmpo_jax.data.layout import DeviceBatch

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (pairs, 2, seq), dtype=np.int32)
    mask = np.ones((pairs, 2, seq), np.int32)
    mask[:, :, : seq // 4] = 0
    return DeviceBatch(input_ids=ids, loss_mask=mask, pair_mask=np.ones(pairs, np.int32))


def compiled_memory(compiled: Any) -> dict:
    """XLA's memory plan of the compiled step, in bytes (what exists on this jax)."""
    stats = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {}
    for f in fields:
        value = getattr(stats, f"{f}_size_in_bytes", None) if stats is not None else None
        out[f"{f}_bytes"] = None if value is None else int(value)
    return out


def timed_steps(step: Callable, state: Any, batch: dict, warmup: int, steps: int):
    """Runs `warmup + steps` steps; returns `(state, metrics, seconds of the timed steps)`.

    Each step is synchronised (block on the new state and the metrics), so a time
    is the whole step, the optimizer update included, and nothing overlaps.
    """
    import jax

    times, metrics = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return state, metrics, times


def worker_ours(job: dict) -> dict:
    """Builds and times our step for one (model, variant); see the module docstring."""
    import jax
    import numpy as np

    from mmpo_jax.config import load_config
    from mmpo_jax.train.setup import build_trainer
    from mmpo_jax.data.layout import batch_shardings

    mark_stage("imported jax and mmpo_jax; building model and state")
    v = job["variant"]
    backend = jax.default_backend()
    s = shape_namespace(job["model"])
    total_steps = job["warmup"] + job["steps"]
    init = {k: getattr(s, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}
    init.update(max_position_embeddings=max(8192, job["seq"]), rms_norm_eps=1e-6)
    # A run config as a user would write it, built the way `mmpo-jax train` builds it:
    # lr as the peer's, constant so every timed step does the same work; one device,
    # the single-GPU case the peer is measured in.
    cfg = load_config(None, [f"model.init.{k}={val}" for k, val in init.items()] + [
        f"model.param_dtype={v['param_dtype']}", f"model.compute_dtype={v['compute_dtype']}",
        f"model.attention={v['attention']}", f"model.scan_layers={v['scan_layers']}", f"model.remat={v['remat']}",
        f"model.logprob_chunk={v['logprob_chunk']}", "model.reference=separate", "loss.name=mmpo",
        "optim.learning_rate=1e-6", "optim.schedule=constant", "optim.warmup_steps=0",
        f"optim.grad_accum={v['grad_accum']}", f"optim.mu_dtype={v['mu_dtype']}",
        f"data.batch_size={job['pairs']}", f"train.max_steps={total_steps}", "train.seed=0",
    ])

    t0 = time.perf_counter()
    trainer = build_trainer(cfg, devices=jax.devices()[:1])
    state, options, arch, step = trainer.state, trainer.options, trainer.arch, trainer.train_step
    host_batch = synthetic_batch(job["pairs"], job["seq"], s.vocab_size)
    # on device before timing, as the peer's ids are
    batch = jax.device_put(host_batch, batch_shardings(trainer.mesh, host_batch))
    jax.block_until_ready((state, batch))
    build_s = time.perf_counter() - t0

    mark_stage(f"built in {build_s:.1f} s; tracing and lowering the step")
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - t0
    mark_stage(f"lowered in {lower_s:.1f} s; compiling")
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mark_stage(f"compiled in {compile_s:.1f} s; running {job['warmup']} + {job['steps']} steps")

    state, metrics, times = timed_steps(compiled, state, batch, job["warmup"], job["steps"])
    med = median(times)
    tokens = step_tokens(job["pairs"], job["seq"])
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "tokens_per_s": tokens / med, "step_s_median": med, "step_s_min": min(times),
        "step_s_all": times, "loss_value": float(metrics["loss"]),
        "nonfinite": float(metrics["nonfinite"]), "grad_norm": float(metrics["grad_norm"]),
        "peak_mem_gib": None if peak is None else peak / GIB,
        "host_peak_rss_gib": host_peak_rss_gib(),
        "build_s": build_s, "lower_s": lower_s, "compile_s": compile_s,
        "xla_memory": compiled_memory(compiled),
        "options": {
            "param_dtype": np.dtype(options.param_dtype).name,
            "compute_dtype": np.dtype(options.compute_dtype).name,
            "attention": options.attention,
            "attention_impl": options.model_choice(arch).kernel,
            "remat": options.remat, "scan_layers": options.scan_layers,
            "logprob_chunk": v["logprob_chunk"], "grad_accum": v["grad_accum"],
            "mu_dtype": v["mu_dtype"],
        },
        "backend": backend, "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
        "mmpo_jax_path": str(Path(sys.modules["mmpo_jax"].__file__).parent),
        "forbidden_modules": forbidden_modules(),
    }


# --------------------------------------------------------------------------- #
# Worker: the peer
# --------------------------------------------------------------------------- #
def worker_peer(job: dict) -> dict:
    """The peer's own `run()` (mmpo loss) on the job's shape, eager or compiled."""
    import importlib.util

    import torch

    mark_stage("imported torch")
    spec = importlib.util.spec_from_file_location("torch_peer_step", PEER_FILE)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the peer's own choice: bf16 on a GPU, float32 on a CPU
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mark_stage(f"imported the peer; in its run() on {device} (model init, warm-up"
               f"{' with torch.compile' if job['mode'] == 'compiled' else ''}, steps)")
    out = peer.run(job["model"], job["seq"], job["pairs"], job["steps"], job["warmup"], device,
                   dtype, "mmpo", job["mode"] == "compiled")
    return {
        "tokens_per_s": out["tokens_per_s"], "step_s_median": out["step_s_median"],
        "step_s_min": out["step_s_min"], "loss_value": out["loss_value"],
        "peak_mem_gib": out["peak_mem_gib"], "host_peak_rss_gib": host_peak_rss_gib(),
        "dtype": str(dtype).removeprefix("torch."), "device": device,
        "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }


WORKERS = {"peak": worker_peak, "ours": worker_ours, "peer": worker_peer}


def worker_main(job_json: str) -> int:
    """Runs one job and prints its result line; an exception becomes an error result."""
    job = json.loads(job_json)
    try:
        result = {"status": "ok", **WORKERS[job["kind"]](job)}
        rc = 0
    except BaseException as e:  # OOM, compile failure, ...: report, let the parent go on
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        rc = 1
    print(RESULT_TAG + json.dumps(result), flush=True)
    return rc


# --------------------------------------------------------------------------- #
# Parent: plan, run each job in a subprocess, compare, print
# --------------------------------------------------------------------------- #
def parse_variant(spec: str, base: dict) -> dict:
    """`base` with the overrides of `spec` ('remat=dots,logprob_chunk=512'; '' = base)."""
    v = dict(base)
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in VARIANT_KEYS:
            raise SystemExit(f"--variants: bad item {item!r}; keys: {', '.join(VARIANT_KEYS)}")
        v[key] = VARIANT_KEYS[key](value.strip())
    return v


def plan_jobs(args: argparse.Namespace) -> list[dict]:
    """Peak first, then per model (in `--models` order): our variants, then the peer modes."""
    base = {
        "remat": args.remat, "attention": args.attention, "param_dtype": args.param_dtype,
        "compute_dtype": args.compute_dtype, "logprob_chunk": args.logprob_chunk,
        "grad_accum": args.grad_accum, "scan_layers": True, "mu_dtype": args.mu_dtype,
    }
    specs = args.variants or [""]
    peer_modes = {"none": [], "eager": ["eager"], "compiled": ["compiled"],
                  "both": ["eager", "compiled"]}[args.peer]
    common = {"seq": args.seq, "pairs": args.pairs, "steps": args.steps, "warmup": args.warmup}
    jobs: list[dict] = []
    if args.peak_size >= 0:
        jobs.append({"kind": "peak", "label": "matmul peak", "size": args.peak_size})
    for model in args.models:
        for spec in specs:
            jobs.append({"kind": "ours", "model": model, "label": spec or "default",
                         "variant": parse_variant(spec, base), **common})
        for mode in peer_modes:
            jobs.append({"kind": "peer", "model": model, "label": mode, "mode": mode, **common})
    return jobs


def child_env() -> dict[str, str]:
    """The parent's environment, plus the checkout on PYTHONPATH and no JAX preallocation
    (a JAX child would otherwise grab 75% of the GPU at start; growing on demand also
    lets `peak_bytes_in_use` be the real peak)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def last_stage(text: str) -> str:
    """The last stage a worker marked, or 'starting' (e.g. still importing)."""
    stages = [line[len(STAGE_TAG):] for line in text.splitlines() if line.startswith(STAGE_TAG)]
    return stages[-1] if stages else "starting (importing)"


def parse_result(text: str) -> dict | None:
    """The last result line a worker printed, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def run_job(job: dict, timeout_s: float, log: Any | None) -> dict:
    """One job in its own process (and process group, so a timeout also ends the
    compile workers torch.compile starts). Returns the job with its result fields."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    t0 = time.perf_counter()
    # a file, not a pipe: no deadlock on a chatty child; bad bytes must not lose the result
    with tempfile.TemporaryFile("w+", errors="replace") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                cwd=REPO, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call created
            rc = proc.wait()
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): leave no job running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        out.seek(0)
        text = out.read()
    wall = time.perf_counter() - t0
    if log is not None:
        log.write(f"===== {job['kind']} {job.get('model', '')} {job['label']} "
                  f"(rc {rc}, {wall:.1f} s) =====\n{text}\n")
        log.flush()
    result = parse_result(text)
    if timed_out:
        result = {"status": "timeout",
                  "error": f"timed out after {timeout_s:.0f} s; last stage: {last_stage(text)}"}
    elif result is None:
        tail = " | ".join(text.strip().splitlines()[-5:])
        result = {"status": "error", "error": f"exit code {rc} without a result (last stage: "
                  f"{last_stage(text)}): {tail[-1500:]}"}
    return {**job, **result, "wall_s": wall}


def add_rates(run: dict, peak_tflops: float | None) -> dict:
    """Model TFLOP/s and MFU of a finished ours/peer run (from its tokens/s)."""
    if run.get("status") != "ok":
        return run
    per_token = step_flops(run["model"], run["seq"], run["pairs"]) / step_tokens(run["pairs"], run["seq"])
    tflops = run["tokens_per_s"] * per_token / 1e12
    return {**run, "model_tflops_per_s": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None}


def comparisons(runs: list[dict]) -> list[dict]:
    """One row per (our variant, peer mode) of the same model; our rows alone if no peer ran."""
    rows = []
    ours = [r for r in runs if r["kind"] == "ours"]
    for o in ours:
        peers = [p for p in runs if p["kind"] == "peer" and p["model"] == o["model"]] or [None]
        for p in peers:
            ok = o.get("status") == "ok" and p is not None and p.get("status") == "ok"
            rows.append({
                "model": o["model"], "seq": o["seq"], "pairs": o["pairs"],
                "ours": o["label"], "peer": None if p is None else p["label"],
                "ours_status": o.get("status"), "peer_status": None if p is None else p.get("status"),
                "ours_tokens_per_s": o.get("tokens_per_s"),
                "peer_tokens_per_s": None if p is None else p.get("tokens_per_s"),
                "ratio": o["tokens_per_s"] / p["tokens_per_s"] if ok else None,
                "ours_model_tflops_per_s": o.get("model_tflops_per_s"), "ours_mfu": o.get("mfu"),
                "peer_model_tflops_per_s": None if p is None else p.get("model_tflops_per_s"),
                "peer_mfu": None if p is None else p.get("mfu"),
                "ours_peak_mem_gib": o.get("peak_mem_gib"),
                "peer_peak_mem_gib": None if p is None else p.get("peak_mem_gib"),
                "mem_ratio": (o["peak_mem_gib"] / p["peak_mem_gib"]
                              if ok and o.get("peak_mem_gib") and p.get("peak_mem_gib") else None),
            })
    return rows


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_table(rows: list[dict], headers: list[tuple[str, Callable[[dict], str]]]) -> str:
    """Left-aligned text table; `headers` are (title, row -> cell)."""
    cells = [[title for title, _ in headers]] + [[cell(r) for _, cell in headers] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def _status_or(run_status: str | None, text: str) -> str:
    return text if run_status in (None, "ok") else run_status.upper()


def main_table(rows: list[dict]) -> str:
    return format_table(rows, [
        ("model", lambda r: r["model"]), ("seq", lambda r: str(r["seq"])),
        ("pairs", lambda r: str(r["pairs"])), ("ours", lambda r: r["ours"]),
        ("peer", lambda r: r["peer"] or "-"),
        ("ours tok/s", lambda r: _status_or(r["ours_status"], _fmt(r["ours_tokens_per_s"], ",.0f"))),
        ("peer tok/s", lambda r: _status_or(r["peer_status"], _fmt(r["peer_tokens_per_s"], ",.0f"))),
        ("ratio", lambda r: _fmt(r["ratio"], ".2f") + ("x" if r["ratio"] else "")),
        ("TFLOP/s", lambda r: _fmt(r["ours_model_tflops_per_s"], ".3g")),
        ("MFU", lambda r: _fmt(None if r["ours_mfu"] is None else 100 * r["ours_mfu"], ".1f")
         + ("%" if r["ours_mfu"] is not None else "")),
        ("peer TFLOP/s", lambda r: _fmt(r["peer_model_tflops_per_s"], ".3g")),
        ("ours GiB", lambda r: _fmt(r["ours_peak_mem_gib"], ".2f")),
        ("peer GiB", lambda r: _fmt(r["peer_peak_mem_gib"], ".2f")),
        ("mem ratio", lambda r: _fmt(r["mem_ratio"], ".2f")),
    ])


def detail_table(runs: list[dict]) -> str:
    """Per run: status, step time, compile time and XLA's memory plan (ours), wall time."""
    def xla(r: dict, key: str) -> str:
        value = (r.get("xla_memory") or {}).get(key)
        return _fmt(None if value is None else value / GIB, ".3g")  # .3g: tiny CPU runs too

    return format_table([r for r in runs if r["kind"] != "peak"], [
        ("run", lambda r: f"{r['kind']} {r['model']} {r['label']}"),
        ("status", lambda r: r.get("status", "-")),
        ("step s", lambda r: _fmt(r.get("step_s_median"), ".4f")),
        ("loss", lambda r: _fmt(r.get("loss_value"), ".4f")),
        ("compile s", lambda r: _fmt(r.get("compile_s"), ".1f")),
        ("XLA arg GiB", lambda r: xla(r, "argument_bytes")),
        ("XLA temp GiB", lambda r: xla(r, "temp_bytes")),
        ("XLA out GiB", lambda r: xla(r, "output_bytes")),
        ("host RSS GiB", lambda r: _fmt(r.get("host_peak_rss_gib"), ".2f")),
        ("wall s", lambda r: _fmt(r.get("wall_s"), ".1f")),
    ])


def write_json(path: str | None, payload: dict) -> None:
    """Atomic write (a later kill leaves the last complete file)."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(p)


def peak_from_file(path: str) -> dict | None:
    """The matmul peak of an earlier run's JSON (same call, same card), labelled as such."""
    try:
        peak = json.loads(Path(path).read_text()).get("peak")
    except (OSError, ValueError):
        return None
    if not peak or peak.get("status") != "ok":
        return None
    return {**peak, "label": f"matmul peak (from {Path(path).name})"}


def summarise(args: argparse.Namespace, runs: list[dict], started: float) -> dict:
    """The full result: arguments, the peak, every run (with rates) and the comparisons."""
    peak = next((r for r in runs if r["kind"] == "peak"), None)
    if peak is None and getattr(args, "peak_from", None):
        peak = peak_from_file(args.peak_from)
    peak_tflops = peak.get("tflops") if peak and peak.get("status") == "ok" else None
    rated = [add_rates(r, peak_tflops) if r["kind"] != "peak" else r for r in runs]
    return {
        "args": vars(args), "elapsed_s": time.perf_counter() - started, "peak": peak,
        "runs": rated, "comparisons": comparisons(rated),
    }


def progress_line(run: dict, elapsed: float) -> str:
    what = f"{run['kind']} {run.get('model', '')} {run['label']}".replace("  ", " ")
    if run.get("status") != "ok":
        return f"[{elapsed:6.1f} s] {what}: {run.get('status')}: {str(run.get('error'))[:300]}"
    if run["kind"] == "peak":
        return (f"[{elapsed:6.1f} s] {what}: {run['tflops']:.3g} TFLOP/s "
                f"({run['dtype']} {run['size']}^2, {run['device_kind']})")
    extra = f", compile {run['compile_s']:.1f} s" if "compile_s" in run else ""
    return (f"[{elapsed:6.1f} s] {what}: {run['tokens_per_s']:,.0f} tok/s, loss "
            f"{run['loss_value']:.4f}{extra} (job {run['wall_s']:.1f} s)")


def report(summary: dict) -> str:
    peak = summary["peak"]
    lines = ["", "== step throughput (tokens/s = 2*pairs*seq / median step; ratio = ours/peer; "
                 "TFLOP/s, MFU: ours) =="]
    lines.append(main_table(summary["comparisons"]))
    if peak and peak.get("status") == "ok":
        lines.append(f"matmul peak for MFU: {peak['tflops']:.3g} TFLOP/s ({peak['dtype']} "
                     f"{peak['size']}^2 in jax {peak['jax']}, {peak['device_kind']}, "
                     f"backend {peak['backend']})")
    else:
        lines.append(f"matmul peak: {'not measured' if not peak else peak.get('error')} (no MFU)")
    lines += ["", "== per run ==", detail_table(summary["runs"])]
    bad = [r for r in summary["runs"] if r.get("status") != "ok"]
    leaked = sorted({m for r in summary["runs"] for m in r.get("forbidden_modules", [])})
    if leaked:
        lines.append(f"WARNING: our process imported {', '.join(leaked)} (absent on the GPU image)")
    for r in bad:
        lines.append(f"{r.get('status', '?').upper()} {r['kind']} {r.get('model', '')} {r['label']}: "
                     f"{str(r.get('error'))[:500]}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=lambda s: [m for m in s.split(",") if m],
                   default=["smollm2-135m", "smollm2-360m", "llama3.2-1b"],
                   help=f"comma-separated, run in this order; from the peer's SHAPES: {', '.join(SHAPES)}")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--peer", choices=["eager", "compiled", "both", "none"], default="both")
    # our step's flags default to the run config's defaults, so the plain `default` row is
    # what `mmpo-jax train` runs
    model, optim = ModelConfig(), OptimConfig()
    p.add_argument("--remat", choices=["none", "full", "dots"], default=model.remat)
    p.add_argument("--attention", choices=["auto", "xla", "cudnn"], default=model.attention)
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=model.param_dtype)
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default=model.compute_dtype,
                   help="auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--logprob-chunk", type=VARIANT_KEYS["logprob_chunk"], default=model.logprob_chunk,
                   help="sequence positions per LM-head chunk; 'none' = full logits")
    p.add_argument("--grad-accum", type=int, default=optim.grad_accum)
    p.add_argument("--mu-dtype", choices=["float32", "bfloat16"], default=optim.mu_dtype)
    p.add_argument("--variants", nargs="+", default=None, metavar="SPEC",
                   help="several of our configs, each 'key=value,...' over the flags above "
                        f"(keys: {', '.join(VARIANT_KEYS)}), e.g. --variants remat=none remat=dots")
    p.add_argument("--peak-size", type=int, default=0,
                   help="matmul size for the peak; 0 = 8192 (GPU) / 1024 (CPU); -1 = skip")
    p.add_argument("--peak-from", default=None, metavar="JSON",
                   help="with --peak-size -1: take the matmul peak (for MFU) from an earlier "
                        "run's --json-out on the same card")
    p.add_argument("--timeout-s", type=float, default=300, help="per job")
    p.add_argument("--budget-s", type=float, default=540,
                   help="all jobs; a job gets at most what is left, none starts with < 15 s left")
    p.add_argument("--no-attention-fallback", action="store_true",
                   help="do not rerun a variant with attention=xla when it failed in cuDNN")
    p.add_argument("--json-out", default=None, help="full results (rewritten after every job)")
    p.add_argument("--log", default=None, help="every job's output (default: JSON path + .log)")
    return p


def attention_fallback(run: dict) -> dict | None:
    """The same job with `attention=xla` when ours failed in the cuDNN attention path.

    One device call must not lose all our numbers to a cuDNN version or shape the image
    does not take; the failed row stays in the results, the retry is labelled.
    """
    if run["kind"] != "ours" or run.get("status") != "error":
        return None
    if run["variant"]["attention"] == "xla" or "cudnn" not in str(run.get("error", "")).lower():
        return None
    job = {k: run[k] for k in ("kind", "model", "seq", "pairs", "steps", "warmup")}
    return {**job, "label": f"{run['label']}+attention=xla(fallback)",
            "variant": {**run["variant"], "attention": "xla"}}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    args = build_parser().parse_args(argv)
    unknown = [m for m in args.models if m not in SHAPES]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(SHAPES)}")
    if min(args.seq, args.pairs, args.steps) < 1 or args.warmup < 0:
        raise SystemExit("--seq, --pairs and --steps must be >= 1, --warmup >= 0")
    started = time.perf_counter()
    jobs = plan_jobs(args)
    log_path = args.log or (args.json_out + ".log" if args.json_out else None)
    log = open(log_path, "w") if log_path else None
    runs: list[dict] = []
    # SIGTERM (an outer timeout) ends the current job and still prints what was measured.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    pending = list(jobs)
    try:
        while pending:
            job = pending.pop(0)
            left = args.budget_s - (time.perf_counter() - started)
            if left < 15:
                run = {**job, "status": "skipped", "error": f"budget of {args.budget_s:.0f} s spent"}
            else:
                try:
                    run = run_job(job, min(args.timeout_s, left), log)
                except KeyboardInterrupt:
                    runs += [{**j, "status": "skipped", "error": "interrupted"} for j in [job] + pending]
                    print("interrupted: skipping the remaining jobs", flush=True)
                    break
            runs.append(run)
            print(progress_line(run, time.perf_counter() - started), flush=True)
            write_json(args.json_out, summarise(args, runs, started))
            retry = None if args.no_attention_fallback else attention_fallback(run)
            if retry is not None:
                pending.insert(0, retry)
    finally:
        if log is not None:
            log.close()
    summary = summarise(args, runs, started)
    write_json(args.json_out, summary)
    print(report(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
