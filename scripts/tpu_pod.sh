#!/bin/bash
# Run the same training script on every worker of a Cloud TPU VM pod, with
# checkpoints on GCS. distckpt.initialize() in the script lets JAX detect
# the pod (it reads the TPU metadata server), so every worker joins one job.
#
#   TPU_NAME=my-pod ZONE=us-central2-b BUCKET=gs://my-bucket/run1 scripts/tpu_pod.sh
#
# Not tested here (no TPU, no real bucket); distckpt on gs:// is tested against
# a GCS emulator: see docs/launch.md and docs/storage.md. On a TPU VM the VM's
# service account is used for GCS: it needs roles/storage.objectAdmin on the
# bucket (retention and clean-up delete objects).
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM name}
ZONE=${ZONE:?set ZONE to its zone}
BUCKET=${BUCKET:?set BUCKET to a gs:// checkpoint location}
PROJECT=${PROJECT:-$(gcloud config get-value project)}
REPO=${REPO:-https://github.com/your-org/distckpt.git}
TRAIN=${TRAIN:-"python examples/train_mlp.py --steps 10000 --model-axis 4"}

ssh_all() {
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
        --worker=all --command "$1"
}

# 1. The same code and environment on every worker.
ssh_all "set -e; test -d distckpt || git clone $REPO distckpt; cd distckpt && git pull --ff-only && \
    python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"

# 2. Train on all workers at once. A preempted (spot) pod sends SIGTERM: the
#    script saves at one agreed step and exits with 75; run this again on the
#    new pod and it resumes from that step.
ssh_all "cd distckpt && DISTCKPT_TIMEOUT_S=600 .venv/bin/$TRAIN --dir $BUCKET 2>&1 | tee -a train-\$(hostname).log"
