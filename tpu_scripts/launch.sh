#!/usr/bin/env bash
# Run `mmpo-jax train CONFIG [key=value ...]` on every worker of the TPU VM at once.
#
#   PROJECT=my-project ZONE=us-west4-a TPU_NAME=mmpo-v5e-16 \
#     tpu_scripts/launch.sh configs/llama3-8b-mmpo-lora.yaml train.output_dir=runs/8b
#
# CONFIG and the overrides are passed word for word (an override with spaces stays one
# argument) and are relative to ~/mmpo-jax on the workers, where setup.sh put the
# checkout. One process per host. Each worker reads its index and the accelerator type
# from the TPU VM's metadata server and exports TPU_ACCELERATOR_TYPE, which makes
# mmpo-jax call `jax.distributed.initialize()`; JAX finds the other workers through the
# same metadata. No addresses to pass.
#
# Every worker starts the run under setsid and nohup, so that it outlives this ssh
# session, and writes ~/mmpo-jax/logs/RUN_ID/worker-N.log and worker-N.pid (N: the
# worker's index). Without DETACH, worker 0's log is streamed here and the command
# returns when every worker's process has exited, with a failure if any failed;
# Ctrl-C here stops the streaming, not the run. DETACH=1: start and return at once.
# Stopping a run: see tpu_scripts/README.md.
#
# RUN_ID: the log directory's name (default: the date and time).
# DRY_RUN=1: print the command, run nothing.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

need_target
if [[ $# -lt 1 ]]; then
  die "usage: $SCRIPT_NAME CONFIG [key=value ...], e.g. $SCRIPT_NAME configs/tiny.yaml train.max_steps=10"
fi

RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}
[[ $RUN_ID =~ ^[A-Za-z0-9_.-]+$ ]] || die "RUN_ID=$RUN_ID: use letters, digits, '.', '_' and '-' only, e.g. RUN_ID=8b-lora-1"

# What each worker runs, in its own shell: W, A, P are that shell's variables.
logs="logs/$RUN_ID"
metadata="curl -sSf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes"
remote="set -eu; cd ~/mmpo-jax; mkdir -p $logs"
remote+="; W=\$($metadata/agent-worker-number); A=\$($metadata/accelerator-type)"
remote+="; L=$logs/worker-\$W.log; : > \$L"  # created before tail reads it
remote+="; TPU_ACCELERATOR_TYPE=\$A PYTHONUNBUFFERED=1 setsid nohup ~/mmpo-venv/bin/mmpo-jax train $(quote "$@")"
remote+=" >> \$L 2>&1 < /dev/null & P=\$!; echo \$P > $logs/worker-\$W.pid"
remote+="; echo \"worker \$W (\$A): pid \$P, log ~/mmpo-jax/\$L\""
if [[ "${DETACH:-0}" != 1 ]]; then
  remote+="; if [ \$W = 0 ]; then tail -n +1 -f --pid=\$P \$L; fi; wait \$P"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all --command "$remote"
