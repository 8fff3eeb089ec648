# Sourced by the one-call device scripts (gpu_all.sh, gpu_ratios.sh): they run from this
# checkout on the GPU image as it is (no install), so the repository root is the working
# directory and on PYTHONPATH. The caller sets OUT_DEFAULT; this sets OUT (made), PY, START.
# shellcheck shell=bash
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
OUT="${OUT:-$OUT_DEFAULT}"
mkdir -p "$OUT"
# shellcheck disable=SC2034  # PY and START are the sourcing script's
PY="${PYTHON:-python3}"
# shellcheck disable=SC2034
START=$(date +%s)
