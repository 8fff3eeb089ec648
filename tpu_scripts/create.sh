#!/usr/bin/env bash
# Create a TPU VM (a slice of one or more hosts) by accelerator type and zone.
#
#   PROJECT=my-project ZONE=us-west4-a TPU_NAME=mmpo-v5e-16 ACCELERATOR=v5litepod-16 \
#     tpu_scripts/create.sh [extra gcloud flags, e.g. --reserved]
#
# RUNTIME_VERSION: the TPU VM image; default by accelerator (Cloud TPU's "TPU
#   software versions" page): v5litepod-* v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5,
#   v6e-* v2-alpha-tpuv6e, v4-* (and v3, v2) tpu-ubuntu2204-base.
# QUEUED=1: request it as a queued resource (waits for capacity; QUEUED_ID names the
#   request, default TPU_NAME, and TPU_NAME the TPU VM it creates); watch it with
#   gcloud compute tpus queued-resources describe QUEUED_ID --project=... --zone=...
# SPOT=1: a Spot TPU (cheaper, preemptible).
# DRY_RUN=1: print the command, run nothing.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

need_target
need_accelerator

default_runtime() {
  case "$1" in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}
if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  RUNTIME_VERSION=$(default_runtime "$ACCELERATOR") ||
    die "RUNTIME_VERSION is not set and ACCELERATOR=$ACCELERATOR has no default; set it, e.g. RUNTIME_VERSION=v2-alpha-tpuv5-lite (list: gcloud compute tpus tpu-vm versions list --zone=$ZONE)"
fi

if [[ "${QUEUED:-0}" == 1 ]]; then
  cmd=(gcloud compute tpus queued-resources create "${QUEUED_ID:-$TPU_NAME}" --node-id="$TPU_NAME"
    --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION")
else
  cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME"
    --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION")
fi
if [[ "${SPOT:-0}" == 1 ]]; then
  cmd+=(--spot)
fi
if [[ $# -gt 0 ]]; then
  cmd+=("$@")
fi
run "${cmd[@]}"
