#!/usr/bin/env bash
# Cloud TPU VM pod slice: create the slice, install magjax on every worker, run on all workers.
# jax.distributed.initialize() (--multihost) finds the other workers by itself; each host feeds
# its own slice of the global batch. Rerunning after a preemption resumes from --workdir, which
# must be shared storage (a gs:// bucket).
#   TPU_NAME=magjax-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     bash launch/tpu_vm.sh configs/arcface.py:r100 gs://bucket/r100 --config.data.dir=gs://bucket/ms1mv2
# The workers get the code from REPO (a git URL or anything `git clone` takes) when it is set,
# else from this checkout: its committed HEAD (`git archive`) is copied to every worker.
set -euo pipefail
config=${1:?usage: launch/tpu_vm.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/tpu_vm.sh CONFIG WORKDIR [overrides...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:=v4-32}"
: "${RUNTIME:=tpu-ubuntu2204-base}" "${REPO:=}"

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
run_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}
if [ -n "$REPO" ]; then
  run_all "test -d magjax || git clone $REPO magjax; cd magjax && git pull -q"
else
  archive=$(mktemp --suffix=.tar)
  trap 'rm -f "$archive"' EXIT
  git -C "$(dirname "$0")/.." archive --format=tar -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":magjax.tar --zone "$ZONE" --worker=all
  run_all "mkdir -p magjax && tar xf magjax.tar -C magjax"
fi
run_all "cd magjax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && \
  .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
args=$(printf ' %q' "$@")
run_all "cd magjax && .venv/bin/python -m magjax.main --multihost \
  --config $config --workdir $workdir$args"
