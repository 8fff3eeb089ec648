"""One summary of a device call's results: the step-throughput JSONs and the memory fit.

    python benchmarks/gpu_summary.py OUT/throughput_1b.json OUT/throughput_small.json \\
        --fit OUT/memory_fit_8b.json [--md table.md]

Per our (model, variant) row: tokens/s, the ratio to the peer's eager and compiled
tokens/s, model TFLOP/s and MFU, our peak memory and its ratio to the peer's eager
peak, and the two targets (peak <= 0.6x the peer's eager peak; tokens/s >= 1.1x the
peer's compiled). Then the peer rows, and the memory-fit plan (and run) lines.
Reads JSON only: imports neither jax nor torch.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

GIB = 2**30
MEM_TARGET = 0.6  # our peak <= 0.6 x the peer's eager peak
SPEED_TARGET = 1.1  # our tokens/s >= 1.1 x the peer's compiled


def _f(v: Any, spec: str, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) + suffix


def rows_from(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    ours = [r for r in runs if r.get("kind") == "ours"]
    peers = {(r["model"], r["label"]): r for r in runs if r.get("kind") == "peer"}
    out = []
    for o in ours:
        eager = peers.get((o["model"], "eager"))
        comp = peers.get((o["model"], "compiled"))
        ok = o.get("status") == "ok"

        def rate(p):
            return (o["tokens_per_s"] / p["tokens_per_s"]
                    if ok and p and p.get("status") == "ok" else None)

        mem = (o["peak_mem_gib"] / eager["peak_mem_gib"]
               if ok and eager and eager.get("status") == "ok" and o.get("peak_mem_gib")
               and eager.get("peak_mem_gib") else None)
        speed = rate(comp)
        xla = o.get("xla_memory") or {}
        out.append({
            "model": o["model"], "variant": o["label"], "status": o.get("status"),
            "tok_s": o.get("tokens_per_s"), "step_ms": None if not ok else 1e3 * o["step_s_median"],
            "vs_eager": rate(eager), "vs_compiled": speed,
            "tflops": o.get("model_tflops_per_s"), "mfu": o.get("mfu"),
            "peak_gib": o.get("peak_mem_gib"), "mem_vs_eager": mem,
            "xla_temp_gib": None if xla.get("temp_bytes") is None else xla["temp_bytes"] / GIB,
            "xla_arg_gib": None if xla.get("argument_bytes") is None else xla["argument_bytes"] / GIB,
            "compile_s": o.get("compile_s"),
            "mem_target": None if mem is None else mem <= MEM_TARGET,
            "speed_target": None if speed is None else speed >= SPEED_TARGET,
            "error": o.get("error"),
        })
    return out, list(peers.values())


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def yes_no(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def render(bench: list[dict], fit: dict | None) -> str:
    parts = []
    runs = [r for b in bench for r in b.get("runs", [])]
    peak = next((b.get("peak") for b in bench if b.get("peak")), None)
    if peak and peak.get("status") == "ok":
        parts.append(f"matmul peak for MFU: {peak['tflops']:.0f} TFLOP/s ({peak['dtype']} "
                     f"{peak['size']}^2, jax {peak.get('jax')}, {peak.get('device_kind')})")
    ours, peers = [], []
    for b in bench:  # pair ours with the peers of the same run (file)
        o, p = rows_from(b.get("runs", []))
        ours += o
        peers += p
    parts.append(md_table(
        ["model", "ours", "tok/s", "step ms", "vs peer eager", "vs peer compiled", "model TFLOP/s",
         "MFU", "peak GiB", "peak / peer eager peak", "XLA arg GiB", "XLA temp GiB", "compile s",
         "mem <= 0.6x", "tok/s >= 1.1x compiled"],
        [[r["model"], r["variant"],
          _f(r["tok_s"], ",.0f") if r["status"] == "ok" else str(r["status"]).upper(),
          _f(r["step_ms"], ".1f"), _f(r["vs_eager"], ".2f", "x"), _f(r["vs_compiled"], ".2f", "x"),
          _f(r["tflops"], ".0f"), _f(None if r["mfu"] is None else 100 * r["mfu"], ".1f", "%"),
          _f(r["peak_gib"], ".2f"), _f(r["mem_vs_eager"], ".2f", "x"), _f(r["xla_arg_gib"], ".2f"),
          _f(r["xla_temp_gib"], ".2f"), _f(r["compile_s"], ".1f"),
          yes_no(r["mem_target"]), yes_no(r["speed_target"])] for r in ours]))
    parts.append(md_table(
        ["model", "peer", "tok/s", "step ms", "model TFLOP/s", "MFU", "peak GiB", "job wall s"],
        [[p["model"], p["label"],
          _f(p.get("tokens_per_s"), ",.0f") if p.get("status") == "ok" else str(p.get("status")).upper(),
          _f(None if p.get("status") != "ok" else 1e3 * p["step_s_median"], ".1f"),
          _f(p.get("model_tflops_per_s"), ".0f"),
          _f(None if p.get("mfu") is None else 100 * p["mfu"], ".1f", "%"),
          _f(p.get("peak_mem_gib"), ".2f"), _f(p.get("wall_s"), ".0f")] for p in peers]))
    bad = [r for r in runs if r.get("status") != "ok" and r.get("kind") != "peak"]
    for r in bad:
        parts.append(f"- {str(r.get('status')).upper()} {r['kind']} {r.get('model')} {r['label']}: "
                     f"{str(r.get('error'))[:400]}")
    if fit:
        rows = []
        for p in fit.get("plans", []):
            x = p["xla_memory"]
            run = p.get("run") or {}
            rows.append([
                p["model"], f"r{p['lora']['rank']} {','.join(p['lora']['targets'])}" if p["lora"] else "full",
                p["param_dtype"], p["remat"], p["reference"], str(p["seq"]), str(p["pairs"]),
                str(p["logprob_chunk"]), p["attention_impl"], p["device"]["kind"],
                _f(x.get("argument_bytes", 0) / GIB, ".2f"), _f(x.get("output_bytes", 0) / GIB, ".2f"),
                _f(x.get("alias_bytes", 0) / GIB, ".2f"), _f(x.get("temp_bytes", 0) / GIB, ".2f"),
                _f(p["total_gib"], ".2f"), yes_no(p["fits_80gb_card"]), _f(p["compile_s"], ".1f"),
                (_f(run.get("peak_gib"), ".2f") if run.get("status") == "ok"
                 else (run.get("status") or "not run")),
                _f(run.get("tokens_per_s"), ",.0f"),
            ])
        parts.append(md_table(
            ["model", "LoRA", "params", "remat", "reference", "seq", "pairs", "chunk", "attention",
             "device", "args GiB", "out GiB", "alias GiB", "temp GiB", "total GiB (plan)",
             "fits 80 GB x0.9", "compile s", "measured peak GiB", "tok/s"], rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", nargs="*", help="step_throughput.py --json-out files")
    p.add_argument("--fit", default=None, help="memory_fit.py --json-out file")
    p.add_argument("--md", default=None, help="also write the summary to this file")
    args = p.parse_args(argv)
    bench = [json.loads(Path(b).read_text()) for b in args.bench if Path(b).is_file()]
    fit = json.loads(Path(args.fit).read_text()) if args.fit and Path(args.fit).is_file() else None
    text = render(bench, fit)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
