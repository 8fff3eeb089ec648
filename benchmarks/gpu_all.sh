#!/usr/bin/env bash
# Every device check of this folder in ONE device call (10-minute limit):
#
#   run(command="bash benchmarks/gpu_all.sh", timeout_s=560)
#
# Within GPU_ALL_BUDGET_S (default 540 s), in this order:
#   1. nvidia-smi, versions (no torch/transformers import: metadata only);
#   1b. packed attention (benchmarks/gpu_attention_check.py, at most ATTN_S = 90 s): the Pallas
#      GPU kernel with segment ids against XLA's dense mask, numerics and fwd+bwd time
#      -> $OUT/attention.json;
#   2. step throughput, Llama-3.2-1B (the hardest targets): the matmul peak, our step as is
#      (the config's defaults: remat=dots), remat=none, bf16 params, the peer eager and compiled
#      -> $OUT/throughput_1b.json (+ .log);
#   3. step throughput, SmolLM2-360M and -135M (our default and remat=none, the peer eager and
#      compiled), with whatever time is left before the memory-fit reserve; MFU from step 2's
#      peak -> $OUT/throughput_small.json (+ .log);
#   4. the Llama-3-8B + LoRA memory fit (benchmarks/memory_fit.py: compiled memory plan at seq
#      2048, 8 pairs, 4 if 8 does not fit; then, time allowing, 2 real steps with the measured
#      peak) with the last FIT_RESERVE_S seconds -> $OUT/memory_fit_8b.json;
#   5. the summary tables (benchmarks/gpu_summary.py) -> $OUT/table.md, printed last.
# Everything printed also goes to $OUT/gpu_all.log. At most 8 files under $OUT.
#
# CPU smoke test of the whole script (tiny shapes, minutes):
#   GPU_ALL_SMOKE=1 JAX_PLATFORMS=cpu OUT=/tmp/gpu_all_smoke bash benchmarks/gpu_all.sh
set -u
OUT_DEFAULT=/tmp/gpu_all_out
# shellcheck source=benchmarks/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
BUDGET="${GPU_ALL_BUDGET_S:-540}"
FIT_RESERVE="${FIT_RESERVE_S:-130}"
A_BUDGET="${A_BUDGET_S:-340}"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

if [ "${GPU_ALL_SMOKE:-0}" = 1 ]; then
    M1=tiny; MSMALL=tiny
    SHAPE=(--seq 64 --pairs 2 --steps 2 --warmup 1 --peak-size 256)
    FIT=(--model tiny --seq 64 --pairs 2 --run-min-s 5)
    ATTN=(--smoke)
else
    M1=llama3.2-1b; MSMALL=smollm2-360m,smollm2-135m
    SHAPE=(--seq 1024 --pairs 8 --steps 8 --warmup 3)
    FIT=()
    ATTN=()
fi

exec > >(tee "$OUT/gpu_all.log") 2>&1

echo "== gpu_all.sh: budget ${BUDGET} s, 1B budget ${A_BUDGET} s, fit reserve ${FIT_RESERVE} s, $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 || true
"$PY" - <<'EOF'
import sys, importlib.metadata as md
v = {}
for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
    try:
        v[p] = md.version(p)
    except md.PackageNotFoundError:
        v[p] = "absent"
print("python", sys.version.split()[0], " ".join(f"{k} {x}" for k, x in v.items()))
EOF

# 1b. packed attention: numerics first (exit code 1 says they failed), then the times
echo "== packed attention check (t=$(( $(date +%s) - START )) s)"
timeout -k 5 "${ATTN_S:-90}" "$PY" benchmarks/gpu_attention_check.py "${ATTN[@]}" | tee "$OUT/attention.json"
echo "gpu_attention_check exit code ${PIPESTATUS[0]}"

# 2. Llama-3.2-1B
a=$(( $(left) - FIT_RESERVE )); [ "$a" -gt "$A_BUDGET" ] && a=$A_BUDGET
echo "== throughput ${M1}: budget ${a} s (t=$(( $(date +%s) - START )) s)"
"$PY" benchmarks/step_throughput.py --models "$M1" "${SHAPE[@]}" --peer both \
    --variants '' remat=none param_dtype=bfloat16 \
    --budget-s "$a" --timeout-s 240 \
    --json-out "$OUT/throughput_1b.json" --log "$OUT/throughput_1b.log"

# 3. the small models, with what is left before the fit's reserve
b=$(( $(left) - FIT_RESERVE ))
if [ "$b" -ge 30 ]; then
    echo "== throughput ${MSMALL}: budget ${b} s (t=$(( $(date +%s) - START )) s)"
    "$PY" benchmarks/step_throughput.py --models "$MSMALL" "${SHAPE[@]}" --peer both \
        --variants '' remat=none --peak-size -1 --peak-from "$OUT/throughput_1b.json" \
        --budget-s "$b" --timeout-s 200 \
        --json-out "$OUT/throughput_small.json" --log "$OUT/throughput_small.log"
else
    echo "== throughput ${MSMALL}: SKIPPED (${b} s left before the fit reserve)"
fi

# 4. Llama-3-8B + LoRA memory fit (plan, then a real run if time allows)
f=$(( $(left) - 8 ))
echo "== memory fit: ${f} s (t=$(( $(date +%s) - START )) s)"
if [ "$f" -ge 20 ]; then
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
        timeout -k 5 "$f" "$PY" benchmarks/memory_fit.py "${FIT[@]}" --run-steps 2 \
        --deadline-s "$(( f - 5 ))" --json-out "$OUT/memory_fit_8b.json"
    echo "memory_fit exit code $?"
else
    echo "memory fit: SKIPPED (${f} s left)"
fi

# 5. summary, last (the reply carries the end of the output)
echo "== summary (t=$(( $(date +%s) - START )) s)"
"$PY" benchmarks/gpu_summary.py "$OUT/throughput_1b.json" "$OUT/throughput_small.json" \
    --fit "$OUT/memory_fit_8b.json" --md "$OUT/table.md"
echo "== done in $(( $(date +%s) - START )) s"
