#!/usr/bin/env bash
# Train on a queued (Spot) TPU slice until the run finishes, asking for the slice again
# after every preemption.
#
#   PROJECT=my-project ZONE=us-east5-a TPU_NAME=mmpo-v5p-64 ACCELERATOR=v5p-64 \
#     tpu_scripts/relaunch.sh configs/llama3-8b-mmpo-lora.yaml train.output_dir=gs://my-bucket/runs/8b
#
# A loop over the queued resource QUEUED_ID (default TPU_NAME):
# - missing: create.sh asks for it (QUEUED=1; a Spot slice unless SPOT=0);
# - waiting (CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING) or DELETING: it
#   checks again every POLL_S seconds (default 60);
# - ACTIVE: setup.sh installs this checkout on the workers, WORKER_SETUP (a command, if
#   set) runs on every worker (e.g. mounting an NFS share), and launch.sh runs CONFIG with
#   the overrides: the same arguments every round, so each round resumes from the run's
#   latest checkpoint;
# - FAILED, SUSPENDING or SUSPENDED (its TPUs are gone): teardown.sh deletes it.
# A round whose run exits 0 (it reached train.max_steps) ends the loop, with status 0.
# A run stopped by SIGINT (status 130: you stopped it) ends it with 130. A run that
# failed otherwise while its slice is still up (the TPU VM READY, the request ACTIVE) is
# not a preemption: the loop stops with the run's status instead of failing again.
# A run that exited 143 (SIGTERM, the preemption notice: it saved a checkpoint) or whose
# slice was preempted is a preemption: the slice is deleted and asked for again. After
# MAX_ROUNDS runs (default 20) the loop gives up.
#
# train.output_dir must outlive the slice: a gs:// bucket (the workers' disks go with
# it), or a share that WORKER_SETUP mounts. The queued resource is left as it is at the
# end: delete it with QUEUED=1 tpu_scripts/teardown.sh.
# DRY_RUN=1: print every command a round can run, in the order of a round that is
# preempted once, and run nothing.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

need_target
need_accelerator
if [[ $# -lt 1 ]]; then
  die "usage: $SCRIPT_NAME CONFIG [key=value ...], e.g. $SCRIPT_NAME configs/tiny.yaml train.output_dir=gs://my-bucket/runs/tiny"
fi
QUEUED_ID=${QUEUED_ID:-$TPU_NAME}
POLL_S=${POLL_S:-60}
MAX_ROUNDS=${MAX_ROUNDS:-20}
[[ $POLL_S =~ ^[0-9]+$ ]] || die "POLL_S=$POLL_S: give whole seconds, e.g. POLL_S=60"
[[ $MAX_ROUNDS =~ ^[1-9][0-9]*$ ]] || die "MAX_ROUNDS=$MAX_ROUNDS: give a count >= 1, e.g. MAX_ROUNDS=20"
here=$(dirname "$0")
where=(--project="$PROJECT" --zone="$ZONE")
export PROJECT ZONE TPU_NAME ACCELERATOR QUEUED_ID DRY_RUN

say() {
  echo "$SCRIPT_NAME: $*" >&2
}

create() { QUEUED=1 SPOT=${SPOT:-1} "$here/create.sh"; }
delete() { QUEUED=1 YES=1 "$here/teardown.sh"; }
setup() {
  "$here/setup.sh"
  if [[ -n "${WORKER_SETUP:-}" ]]; then
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$WORKER_SETUP"
  fi
}
launch() { DETACH=0 "$here/launch.sh" "$@"; }
request_state=(gcloud compute tpus queued-resources describe "$QUEUED_ID" "${where[@]}" "--format=value(state.state)")
vm_state=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" "--format=value(state)")

if [[ "$DRY_RUN" == 1 ]]; then
  quote "${request_state[@]}"
  create
  setup
  launch "$@"
  quote "${vm_state[@]}"
  delete
  exit 0
fi

# The queued resource's state, or NONE when there is none; stops on any other error
# (no credentials, a wrong project), which waiting would not mend.
state_of_request() {
  local out
  if out=$("${request_state[@]}" 2>&1); then
    echo "$out"
  elif [[ $out == *NOT_FOUND* ]]; then
    echo NONE
  else
    echo "$out" >&2
    die "cannot read the state of the queued resource $QUEUED_ID (gcloud's message above)"
  fi
}

rounds=0
while :; do
  state=$(state_of_request) || exit 2
  case $state in
    NONE)
      say "asking for the slice $TPU_NAME ($ACCELERATOR) as the queued resource $QUEUED_ID"
      create ;;
    CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | DELETING)
      say "the queued resource $QUEUED_ID is $state; checking again in $POLL_S s"
      sleep "$POLL_S" ;;
    FAILED | SUSPENDING | SUSPENDED)
      say "the queued resource $QUEUED_ID is $state (its TPUs are gone): deleting it, to ask again"
      delete ;;
    ACTIVE)
      if ((rounds >= MAX_ROUNDS)); then
        die "gave up after MAX_ROUNDS=$MAX_ROUNDS runs; the run resumes from its latest checkpoint when you run this again"
      fi
      rounds=$((rounds + 1))
      say "round $rounds: the slice is up; installing and launching"
      setup
      status=0
      launch "$@" || status=$?
      if ((status == 0)); then
        say "the run finished (round $rounds)"
        exit 0
      fi
      if ((status == 130)); then
        say "the run was stopped with SIGINT (status 130); not relaunching"
        exit 130
      fi
      vm=$("${vm_state[@]}" 2>/dev/null) || vm=GONE
      if ((status != 143)) && [[ $vm == READY ]] && [[ $(state_of_request) == ACTIVE ]]; then
        say "the run failed with status $status on a slice that is still up: not a preemption, not relaunching (the workers' logs say why)"
        exit "$status"
      fi
      say "round $rounds ended by a preemption (run status $status, TPU VM ${vm:-GONE}): deleting the slice, to ask again"
      delete ;;
    *)
      die "the queued resource $QUEUED_ID is in a state this script does not know: '$state'" ;;
  esac
done
