# shellcheck shell=bash
# Shared by create.sh, setup.sh, launch.sh and teardown.sh (sourced, not run).
#
# `run CMD ARGS...` prints the command as one shell-quoted line (on stderr, after
# '+ '), then runs it; with DRY_RUN=1 it only prints it, on stdout, one command a
# line and nothing else, so a dry run shows exactly what a real one would execute
# (and each line can be pasted into a shell as it is).
#
# Written for bash 3.2 too (macOS's /bin/bash; tested with bash 5): no ${var@Q}, no
# expansion of an empty array under set -u.
set -euo pipefail

SCRIPT_NAME=$(basename "$0")
DRY_RUN=${DRY_RUN:-0}
if [[ "$DRY_RUN" != 0 && "$DRY_RUN" != 1 ]]; then
  echo "$SCRIPT_NAME: error: DRY_RUN=$DRY_RUN: use DRY_RUN=1 to print the commands without running them" >&2
  exit 2
fi

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 2
}

# need VAR "what it is, e.g. VAR=value": stops with the variable's name and the example
# when VAR is unset or empty.
need() {
  local name=$1 help=$2
  if [[ -z "${!name:-}" ]]; then
    die "$name is not set: $help"
  fi
}

# The arguments as one line of shell words, each read back by a shell (here, or on a
# worker over ssh) as the one argument it was: bare when it has no special character,
# else in single quotes ('\'' for a quote inside); printf %q where it has a control
# character (a newline), so that the line stays one line.
quote() {
  local line="" word w q="'"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      w=$word
    elif [[ $word == *[[:cntrl:]]* ]]; then
      printf -v w '%q' "$word"
    else
      w=$q
      while [[ $word == *"$q"* ]]; do
        w+="${word%%"$q"*}$q\\$q$q"
        word=${word#*"$q"}
      done
      w+="$word$q"
    fi
    line+="${line:+ }$w"
  done
  printf '%s\n' "$line"
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# run_shell LINE: a pipeline, printed as it is and run by bash with pipefail.
run_shell() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$1"
  else
    echo "+ $1" >&2
    bash -o pipefail -c "$1"
  fi
}

need_target() {
  need PROJECT "the Google Cloud project, e.g. PROJECT=my-project"
  need ZONE "a zone that has the TPU type, e.g. ZONE=us-west4-a (v5e) or ZONE=us-east5-a (v5p)"
  need TPU_NAME "the TPU VM's name, e.g. TPU_NAME=mmpo-v5e-16"
}

need_accelerator() {
  need ACCELERATOR "the accelerator type, e.g. ACCELERATOR=v5litepod-16 (16 v5e chips) or ACCELERATOR=v5p-64 (32 v5p chips)"
}
