#!/usr/bin/env bash
# GCP TPU VM lifecycle for cpo_jax (single- or multi-host). Usage:
#   launch/tpu_vm.sh create|setup|run|logs|delete [-- extra cpo_jax.main flags]
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [cpo-jax], ZONE [us-east5-b], ACCELERATOR [v5p-8], RUNTIME [v2-alpha-tpuv5],
#   PROJECT [gcloud's default], CONFIG [configs/medical.py], WORKDIR [gs://$BUCKET/cpo_jax/$TPU_NAME],
#   REPO [this checkout, copied with gcloud scp], SPOT [0; 1 = spot VM]
set -euo pipefail
cmd="${1:?usage: $0 create|setup|run|logs|delete [-- flags]}"; shift || true
[[ "${1:-}" == "--" ]] && shift
TPU_NAME="${TPU_NAME:-cpo-jax}"
ZONE="${ZONE:-us-east5-b}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
CONFIG="${CONFIG:-configs/medical.py}"
WORKDIR="${WORKDIR:-gs://${BUCKET:?set BUCKET or WORKDIR}/cpo_jax/$TPU_NAME}"
project_flag=(); [[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm "${project_flag[@]}")
# Every host runs the same command: JAX's multi-host runtime needs all workers started.
on_all() { "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

case "$cmd" in
  create)
    spot=(); [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
    "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME" "${spot[@]}" ;;
  setup)
    here="$(cd "$(dirname "$0")/.." && pwd)"
    tar -C "$here" --exclude=.git -czf /tmp/cpo_jax_src.tgz .
    "${tpu[@]}" scp /tmp/cpo_jax_src.tgz "$TPU_NAME:~/" --zone="$ZONE" --worker=all
    on_all 'mkdir -p ~/cpo_jax && tar -xzf ~/cpo_jax_src.tgz -C ~/cpo_jax && cd ~/cpo_jax &&
            python3 -m venv ~/venv && ~/venv/bin/pip install -q -e ".[tpu]"' ;;
  run)
    # nohup so a dropped ssh does not kill the job; --distributed calls jax.distributed.initialize().
    on_all "cd ~/cpo_jax && nohup ~/venv/bin/python -m cpo_jax.main --config=$CONFIG \
            --workdir=$WORKDIR --distributed $* > ~/cpo_jax.log 2>&1 &" ;;
  logs)
    "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=0 --command='tail -n 50 -f ~/cpo_jax.log' ;;
  delete)
    "${tpu[@]}" delete "$TPU_NAME" --zone="$ZONE" --quiet ;;
  *) echo "unknown command $cmd; expected create|setup|run|logs|delete" >&2; exit 2 ;;
esac
