#!/usr/bin/env bash
# Same-call ratios against the peer's torch.compile for every size, in ONE device call:
#
#   run(command="bash benchmarks/gpu_ratios.sh", timeout_s=590)
#
# gpu_all.sh ran out of budget before the compiled peer of the small models (its warm-up
# takes 90-140 s); this plan drops what earlier calls already measured on the same card kind
# (the peer eager, the 8B fit) and spends the budget on the compiled peer:
#   1. Llama-3.2-1B: our default, logprob_chunk=512 and =1024, the peer compiled
#      -> $OUT/throughput_1b.json (+ .log);
#   2. SmolLM2-135M then -360M: our default, the peer compiled, with what is left
#      -> $OUT/throughput_small.json (+ .log);
#   3. the summary table -> $OUT/table.md, printed last.
# CPU smoke test: GPU_RATIOS_SMOKE=1 JAX_PLATFORMS=cpu OUT=/tmp/ratios bash benchmarks/gpu_ratios.sh
set -u
OUT_DEFAULT=/tmp/gpu_ratios_out
# shellcheck source=benchmarks/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
BUDGET="${GPU_RATIOS_BUDGET_S:-560}"
left() { echo $(( BUDGET - ($(date +%s) - START) - 10 )); }

if [ "${GPU_RATIOS_SMOKE:-0}" = 1 ]; then
    M1=tiny; MSMALL=tiny; PEER_TIMEOUT=120
    SHAPE=(--seq 64 --pairs 2 --steps 2 --warmup 1 --peak-size 256)
else
    M1=llama3.2-1b; MSMALL=smollm2-135m,smollm2-360m; PEER_TIMEOUT=200
    SHAPE=(--seq 1024 --pairs 8 --steps 8 --warmup 3)
fi

exec > >(tee "$OUT/gpu_ratios.log") 2>&1
echo "== gpu_ratios.sh: budget ${BUDGET} s, $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true

echo "== throughput ${M1} (t=$(( $(date +%s) - START )) s)"
"$PY" benchmarks/step_throughput.py --models "$M1" "${SHAPE[@]}" --peer compiled \
    --variants '' logprob_chunk=512 logprob_chunk=1024 \
    --budget-s "$(left)" --timeout-s "$PEER_TIMEOUT" \
    --json-out "$OUT/throughput_1b.json" --log "$OUT/throughput_1b.log"

echo "== throughput ${MSMALL} (t=$(( $(date +%s) - START )) s)"
"$PY" benchmarks/step_throughput.py --models "$MSMALL" "${SHAPE[@]}" --peer compiled \
    --peak-size -1 --peak-from "$OUT/throughput_1b.json" \
    --budget-s "$(left)" --timeout-s "$PEER_TIMEOUT" \
    --json-out "$OUT/throughput_small.json" --log "$OUT/throughput_small.log"

echo "== summary (t=$(( $(date +%s) - START )) s)"
"$PY" benchmarks/gpu_summary.py "$OUT/throughput_1b.json" "$OUT/throughput_small.json" \
    --md "$OUT/table.md"
echo "== done in $(( $(date +%s) - START )) s"
