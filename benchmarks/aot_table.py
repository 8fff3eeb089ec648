"""The per-chip memory table of tpu_scripts/README.md, from `mmpo-jax aot-check --json` results.

    python benchmarks/aot_table.py tpu_scripts/aot_results

Each JSON in the folder is one real compile (the commands are in tpu_scripts/README.md);
this script only lays them out: one line per (model, fine-tuning, chip kind), the
smallest slice that fits first, then any smaller slice that was compiled and did not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 2**30


def model_label(d: dict) -> str:
    """'Llama-3-8B' etc. from the architecture in the result (hidden size, layers, vocab)."""
    m = d["model"]
    known = {(576, 30, 49152): "SmolLM2-135M", (2048, 16, 128256): "Llama-3.2-1B",
             (4096, 32, 128256): "Llama-3-8B", (8192, 80, 128256): "Llama-3-70B shape",
             (4096, 36, 151936): "Qwen3-8B", (5120, 64, 151936): "Qwen3-32B", (5376, 62, 262208): "Gemma-3-27B"}
    return known.get((m["hidden_size"], m["layers"], m["vocab_size"]),
                     f"{m['params'] / 1e9:.1f}B ({m['hidden_size']} x {m['layers']})")


def tuning_label(d: dict) -> str:
    m = d["model"]
    return f"LoRA r{m['lora_rank']}" if m["lora_rank"] else "full"


def memory_cell(d: dict) -> str:
    p = d["per_device_bytes"]
    if p is None:
        r = d["xla_refused"]
        need = f"{r['required_bytes'] / GIB:.1f} GiB" if r.get("required_bytes") else "?"
        have = f"{r['available_bytes'] / GIB:.1f} GiB" if r.get("available_bytes") else "?"
        return f"XLA refused: needs {need} of {have}"
    return f"{p['total'] / GIB:.2f} GiB ({p['total'] / d['device_memory_bytes']:.0%})"


def seq_cell(d: dict) -> str:
    """The sequence length, or a packed batch's row length (a row per pair)."""
    b = d["batch"]
    packing = b.get("packing", "none")
    return f"{b['seq']}" if packing == "none" else f"{b['pack_length']} ({packing.replace('_', ' ')})"


def row(d: dict) -> str:
    verdict = "**fits**" if d["fits"] else "does not fit"
    state = d.get("state_bytes_per_device")  # absent from results of aot-check before it reported it
    state = f"{state / GIB:.2f} GiB" if state is not None else "-"
    tensor = d["mesh"].get("tensor", 1)
    chips = f"{d['chips']}; tensor {tensor}" if tensor > 1 else f"{d['chips']}"
    # results from before aot-check reported the kernel were all XLA attention
    attention = d["model"].get("attention", "xla")
    return (f"| {model_label(d)} | {tuning_label(d)} | {d['model']['remat']} | `{d['topology']}` ({chips}) | "
            f"{d['batch']['pairs']} | {seq_cell(d)} | {attention} | {memory_cell(d)} | {state} | {verdict} | "
            f"{d['compile_seconds']:.0f} s |")


def table(results: list[dict]) -> str:
    order = ["SmolLM2-135M", "Llama-3.2-1B", "Llama-3-8B", "Llama-3-70B shape", "Qwen3-8B", "Qwen3-32B",
             "Gemma-3-27B"]

    def key(d: dict):
        label = model_label(d)
        return (order.index(label) if label in order else len(order), label, bool(d["model"]["lora_rank"]) is False,
                d["batch"]["seq"], d["topology"].split(":")[0], not d["fits"], d["chips"], d["mesh"].get("tensor", 1),
                d["model"].get("attention", "xla"))

    lines = ["| model | fine-tuning | remat | topology (chips) | pairs | seq | attention | per-chip total (of HBM) | "
             "state per chip | verdict | compile |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(d) for d in sorted(results, key=key)]
    return "\n".join(lines)


def main(folder: str) -> None:
    results = []
    for path in sorted(Path(folder).glob("*.json")):
        text = path.read_text().strip()
        if not text:  # a compile still running writes its JSON at the end
            print(f"skipped {path}: empty", file=sys.stderr)
            continue
        results.append(json.loads(text))
    if not results:
        sys.exit(f"no aot-check JSON results in {folder}")
    print(table(results))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tpu_scripts/aot_results")
