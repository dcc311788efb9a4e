#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it, install decoderjax on every worker, and run the
# same command on all workers at once (jax.distributed finds the coordinator by itself).
#
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket \
#     launch/tpu_pod.sh create      # once
#   ... launch/tpu_pod.sh install   # once per code change
#   ... launch/tpu_pod.sh train --config=configs/gpt2_124m.py --config.mesh.fsdp=-1
#   ... launch/tpu_pod.sh delete
#
# The workdir must be shared storage all workers see (a GCS bucket): Orbax writes each
# worker's shards there and restores them onto whatever mesh the next run uses.
set -euxo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO=${REPO:-https://github.com/decoderjax/decoderjax.git}
WORKDIR=${WORKDIR:-${BUCKET:?set BUCKET or WORKDIR}/${TPU_NAME}}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:?create | install | train ARGS | delete}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  install)
    ssh_all "set -e; [ -d decoderjax ] || git clone $REPO decoderjax; cd decoderjax; git pull;
      python3 -m venv .venv; .venv/bin/pip install -q -e '.[tfds]' 'jax[tpu]'"
    ;;
  train)
    shift
    ssh_all "cd decoderjax && .venv/bin/python -m decoderjax.train --workdir=$WORKDIR $*"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
esac
