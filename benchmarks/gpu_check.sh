#!/usr/bin/env bash
# The GPU check of benchmarks/step_throughput.py, as ONE device call (10-minute limit):
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
#   run(command="bash benchmarks/gpu_check.sh --peer eager --variants '' remat=dots", timeout_s=600)
#
# Llama-3.2-1B first (the size with the hardest targets), our default step and the
# peer eager + compiled, everything inside a 530 s budget so that the table always
# prints before the call's limit. Extra arguments go last and override the defaults.
# Results: $OUT/step_throughput.json and every job's output in $OUT/step_throughput.json.log.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/step_throughput_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit --format=csv || true
python3 -c 'import sys, jax, flax, torch, transformers; print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "torch", torch.__version__, "transformers", transformers.__version__, jax.devices())'
python3 benchmarks/step_throughput.py \
    --models llama3.2-1b,smollm2-360m,smollm2-135m --seq 1024 --pairs 8 \
    --steps 8 --warmup 3 --peer both --budget-s 530 --timeout-s 240 \
    --json-out "$OUT/step_throughput.json" "$@"
