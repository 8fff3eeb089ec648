#!/usr/bin/env bash
# Delete the TPU VM (or, with QUEUED=1, the queued resource and its TPU VM).
#
#   PROJECT=my-project ZONE=us-west4-a TPU_NAME=mmpo-v5e-16 tpu_scripts/teardown.sh
#
# QUEUED=1: delete the queued resource QUEUED_ID (default TPU_NAME) with --force,
#   which deletes its TPU VM first.
# YES=1: no confirmation prompt (gcloud's --quiet).
# DRY_RUN=1: print the command, run nothing.
# A TPU VM bills until it is deleted. Its disks (checkpoints, logs) go with it: copy
# what you need first (see tpu_scripts/README.md).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

need_target

if [[ "${QUEUED:-0}" == 1 ]]; then
  cmd=(gcloud compute tpus queued-resources delete "${QUEUED_ID:-$TPU_NAME}" --project="$PROJECT" --zone="$ZONE" --force)
else
  cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE")
fi
if [[ "${YES:-0}" == 1 ]]; then
  cmd+=(--quiet)
fi
run "${cmd[@]}"
