#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM pod slice (e.g. v4-32, v5p-64): one JAX process per
# worker VM, started together over ssh. JAX finds the other workers itself (--distributed=on).
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh \
#       --config=experiments/gemma7b.py --workdir=gs://bucket/runs/g7 --config.data.path=/mnt/acts
#
# Needs on every worker: this repository at $REPO (default ~/gsae_jax) with its .venv
# (launch/setup_venv.sh, jax[tpu]), the shard folder on a shared or replicated disk, and a
# workdir every worker can write (a gs:// bucket or NFS): all processes write one Orbax
# checkpoint together. Check the memory plan first with --dry_run --dry_run_devices=<chips>.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"; : "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO=${REPO:-'~/gsae_jax'}
MODULE=${MODULE:-launch.train}
ARGS=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="cd $REPO && . .venv/bin/activate && python -m $MODULE --distributed=on$ARGS"
