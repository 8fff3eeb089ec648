#!/usr/bin/env bash
# Install this checkout of mmpo-jax on every worker of the TPU VM.
#
#   PROJECT=my-project ZONE=us-west4-a TPU_NAME=mmpo-v5e-16 tpu_scripts/setup.sh
#
# Packs the checkout (tracked and untracked files that git does not ignore: your
# uncommitted changes go too, runs/ and venvs do not; GNU tar), copies it to every
# worker, unpacks it into ~/mmpo-jax (over an older copy; runs/ there is kept) and
# installs it with `jax[tpu]` (libtpu) into the virtual environment ~/mmpo-venv. The
# TPU VM images ship Python 3.10 and mmpo-jax needs >= 3.11, so uv (installed to
# ~/.local/bin if missing) provides PYTHON_VERSION (default 3.11).
#
# JAX_VERSION: pin jax on the workers (jax[tpu]==JAX_VERSION picks the matching
#   libtpu), e.g. the version you ran aot-check with; default: the newest.
# TARBALL: where the local archive is written (default $TMPDIR/mmpo-jax-src.tar.gz).
# DRY_RUN=1: print the commands, run nothing (the archive is not written either).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

need_target

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARBALL=${TARBALL:-${TMPDIR:-/tmp}/mmpo-jax-src.tar.gz}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_SPEC="jax[tpu]"
if [[ -n "${JAX_VERSION:-}" ]]; then
  JAX_SPEC="jax[tpu]==$JAX_VERSION"
fi

# --ignore-failed-read: a tracked file deleted in the working tree is listed but absent
run_shell "git -C $(quote "$REPO") ls-files -z -co --exclude-standard | tar -C $(quote "$REPO") --null -T - --ignore-failed-read -czf $(quote "$TARBALL")"

run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:mmpo-jax-src.tar.gz" --project="$PROJECT" --zone="$ZONE" --worker=all

# what each worker runs (its shell expands ~ and $HOME)
uv="\$HOME/.local/bin/uv"
install="set -euo pipefail; mkdir -p ~/mmpo-jax; tar -xzf ~/mmpo-jax-src.tar.gz -C ~/mmpo-jax"
install+="; test -x $uv || curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR=\$HOME/.local/bin sh"
install+="; $uv venv --allow-existing --python $(quote "$PYTHON_VERSION") ~/mmpo-venv"
install+="; $uv pip install --python ~/mmpo-venv/bin/python -e ~/mmpo-jax $(quote "$JAX_SPEC")"
install+="; ~/mmpo-venv/bin/mmpo-jax --help > /dev/null; echo \"mmpo-jax installed on \$(hostname)\""
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all --command "$install"
