#!/usr/bin/env bash
# GCP TPU VM lifecycle for cpo_jax, single- or multi-host (launch/README.md walks through a run).
#   launch/tpu_vm.sh [--dry-run] COMMAND [--dry-run] [-- ARGS]
# Commands:
#   queue        request the TPU as a queued resource (QUEUED_RESOURCE; its node is TPU_NAME)
#   status       the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...)
#   list         the zone's queued resources and TPU VMs
#   dequeue      delete the queued resource and its TPU VM
#   create       create the TPU VM at once, without the queue (QUEUED=1: same as queue)
#   delete       delete the TPU VM (QUEUED=1: same as dequeue)
#   setup        copy this checkout to every worker and install it pinned by launch/constraints.txt
#   run          start cpo_jax.main on every worker, --distributed; ARGS: more cpo_jax.main flags
#   logs         follow worker 0's log (WORKER=n: worker n's)
#   ssh          a shell on worker 0 (WORKER=n: worker n); `ssh -- COMMAND`: COMMAND on every worker
#   constraints  print launch/constraints.txt from the active Python environment (local only)
# Settings come from the environment [defaults]:
#   TPU_NAME [cpo-jax], ZONE [us-east5-a], ACCELERATOR [v5p-8], RUNTIME [JAX's for ACCELERATOR],
#   PROJECT [gcloud's default], QUEUED_RESOURCE [TPU_NAME], SPOT [0; 1: spot VMs], QUEUED [0],
#   WORKER [0], CONFIG [configs/medical.py], BUCKET, WORKDIR [gs://BUCKET/cpo_jax/TPU_NAME],
#   UV_VERSION [0.13.9], DRY_RUN [0; 1: as --dry-run]
# --dry-run prints every gcloud and tar command instead of running it, one per line, quoted as
# bash's printf %q quotes: nothing touches the network and gcloud need not be installed.
#
# The gcloud flags are those of `gcloud compute tpus queued-resources create|describe|list|delete
# --help` and `gcloud compute tpus tpu-vm create|ssh|scp|delete|list --help` (Cloud SDK 528.0.0),
# as on https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create and
# https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh; `--spot` is taken by both
# create commands, `queued-resources delete --force` also deletes the resource's TPU VM.
set -euo pipefail

usage() { sed -n '2,/^#$/{/^#$/d;s/^# \{0,1\}//;p;}' "$0" >&2; }

dry_run="${DRY_RUN:-0}"
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi
cmd="${1:-}"
[[ -z "$cmd" || "$cmd" == help || "$cmd" == -h || "$cmd" == --help ]] && { usage; exit 2; }
shift
if [[ "${1:-}" == --dry-run ]]; then
  dry_run=1
  shift
fi
[[ "${1:-}" == -- ]] && shift
# Only run and ssh take ARGS: anything else (a misplaced --dry-run) stops here, before gcloud.
if [[ "$cmd" != run && "$cmd" != ssh ]] && (($#)); then
  echo "$cmd takes no arguments, got: $*" >&2
  exit 2
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
TPU_NAME="${TPU_NAME:-cpo-jax}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-$TPU_NAME}"
CONFIG="${CONFIG:-configs/medical.py}"
UV_VERSION="${UV_VERSION:-0.13.9}"
# The TPU software versions Google lists for JAX (https://cloud.google.com/tpu/docs/runtimes).
if [[ -z "${RUNTIME:-}" ]]; then
  case "$ACCELERATOR" in
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) echo "no default RUNTIME for ACCELERATOR=$ACCELERATOR; set RUNTIME" >&2; exit 2 ;;
  esac
fi
# (An empty array is expanded as ${a[@]+"${a[@]}"}: bash before 4.4, as on macOS, takes a plain
# "${a[@]}" of an empty array for an unbound variable under set -u.)
project=()
[[ -n "${PROJECT:-}" ]] && project=(--project="$PROJECT")
spot=()
[[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
# The constraints file pins what the tests passed with. libtpu is not in it: jax[tpu] pins the
# libtpu of the pinned jax, from PyPI or from the page of libtpu wheels JAX's install docs add.
constraints=launch/constraints.txt
libtpu_index=https://storage.googleapis.com/jax-releases/libtpu_releases.html

# Runs a command, or with --dry-run prints it (one line, shell-quoted) instead.
x() {
  if [[ "$dry_run" == 1 ]]; then
    local line
    line="$(printf '%q ' "$@")"
    printf '%s\n' "${line% }"
  else
    "$@"
  fi
}
# gcloud ARGS [--project=PROJECT].
g() { x gcloud "$@" ${project[@]+"${project[@]}"}; }
# `on WORKERS COMMAND`: COMMAND on those workers of the TPU VM ("all": every host at once).
on() { g compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$1" --command="$2"; }

queue() {
  g compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
    --zone="$ZONE" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
    ${spot[@]+"${spot[@]}"}
}
dequeue() {
  g compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone="$ZONE" --force --quiet
}

# The Python (X.Y) the constraints were made with, from their first line.
python_version() {
  local v
  v="$(sed -n 's/^# python \([0-9]*\.[0-9]*\).*/\1/p' "$root/$constraints")"
  [[ -n "$v" ]] || { echo "no '# python X.Y' line in $constraints" >&2; exit 1; }
  printf '%s\n' "$v"
}

if [[ "$dry_run" != 1 && "$cmd" != constraints ]] && ! command -v gcloud > /dev/null; then
  echo "gcloud not found: install the Google Cloud CLI (or use --dry-run)" >&2
  exit 1
fi

case "$cmd" in
  queue) queue ;;
  status) g compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE" ;;
  list)
    g compute tpus queued-resources list --zone="$ZONE"
    g compute tpus tpu-vm list --zone="$ZONE" ;;
  dequeue) dequeue ;;
  create)
    if [[ "${QUEUED:-0}" == 1 ]]; then
      queue
    else
      g compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
        --version="$RUNTIME" ${spot[@]+"${spot[@]}"}
    fi ;;
  delete)
    if [[ "${QUEUED:-0}" == 1 ]]; then
      dequeue
    else
      g compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    fi ;;
  setup)
    # A fresh copy of this checkout on every worker, installed into ~/venv with the pinned
    # versions. The TPU images' own python3 may be older than the project allows (setup.py:
    # >= 3.11), so uv (pinned, from PyPI) makes the venv with the Python the pins were made with.
    tgz="${TMPDIR:-/tmp}/cpo_jax_src_$TPU_NAME.tgz"
    x tar -C "$root" --exclude=.git --exclude=./workdir --exclude=./.venv --exclude=__pycache__ \
      --exclude=.ruff_cache --exclude='*.egg-info' -czf "$tgz" .
    g compute tpus tpu-vm scp "$tgz" "$TPU_NAME:~/cpo_jax_src.tgz" --zone="$ZONE" --worker=all
    remote='set -e; rm -rf ~/cpo_jax; mkdir ~/cpo_jax; tar -xzf ~/cpo_jax_src.tgz -C ~/cpo_jax'
    remote+="; cd ~/cpo_jax; python3 -m pip install -q -U --target ~/.cpo_jax_uv uv==$UV_VERSION"
    remote+="; ~/.cpo_jax_uv/bin/uv venv -q --clear --seed --python $(python_version) ~/venv"
    remote+="; ~/venv/bin/pip install -q -c $constraints -e '.[tpu]' -f $libtpu_index"
    remote+="; ~/venv/bin/python -c 'import cpo_jax, jax; print(jax.__version__)'"
    on all "$remote" ;;
  run)
    # Every worker starts the same program (JAX's multi-host runtime needs them all);
    # --distributed calls jax.distributed.initialize(); nohup: a dropped ssh leaves it running.
    # On SIGTERM (maintenance, spot preemption) the run saves and exits 0; `run` again resumes
    # from the workdir's checkpoints.
    workdir="${WORKDIR:-gs://${BUCKET:?set BUCKET or WORKDIR}/cpo_jax/$TPU_NAME}"
    flags="--config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$workdir") --distributed"
    (($#)) && flags+="$(printf ' %q' "$@")"
    main="python -m cpo_jax.main $flags"
    on all "cd ~/cpo_jax && nohup ~/venv/bin/$main >> ~/cpo_jax.log 2>&1 < /dev/null &" ;;
  logs) on "${WORKER:-0}" 'tail -n 100 -F ~/cpo_jax.log' ;;
  ssh)
    if (($#)); then
      on "${WORKER:-all}" "$*"
    else
      g compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="${WORKER:-0}"
    fi ;;
  constraints)
    # Regenerate with: launch/tpu_vm.sh constraints > launch/constraints.txt (in the venv the
    # tests passed in). It pins setup.py's install_requires and tpu extra with everything they
    # pull in, as installed here; torch, CUDA and test/bench-only packages stay out.
    "${PYTHON:-python3}" - "$root" << 'PY'
import ast
import importlib.metadata as md
import pathlib
import platform
import re
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

setup_py = pathlib.Path(sys.argv[1], 'setup.py').read_text()
call = next(
  n for n in ast.walk(ast.parse(setup_py))
  if isinstance(n, ast.Call) and getattr(n.func, 'id', '') == 'setup'
)
kwargs = {k.arg: k.value for k in call.keywords}
wanted = ast.literal_eval(kwargs['install_requires'])
wanted += ast.literal_eval(kwargs['extras_require'])['tpu']
left_out = re.compile(r'^(torch|torchvision|triton|nvidia-.*|.*cuda.*|cpo-jax)$')
pins, absent, todo = {}, set(), [Requirement(r) for r in wanted]
while todo:
  req = todo.pop()
  name = canonicalize_name(req.name)
  if left_out.match(name):
    continue
  try:
    dist = md.distribution(req.name)
  except md.PackageNotFoundError:
    absent.add(name)
    continue
  extras = set(req.extras)
  if name in pins:
    if extras <= pins[name][1]:
      continue
    extras |= pins[name][1]
  pins[name] = (dist.version, extras)
  for text in dist.requires or []:
    sub = Requirement(text)
    if sub.marker is None or any(sub.marker.evaluate({'extra': e}) for e in extras | {''}):
      todo.append(sub)
v = sys.version_info
print(f'# python {v.major}.{v.minor}.{v.micro} ({sys.platform} {platform.machine()})')
print('# The versions the tests passed with: setup.py install_requires and the tpu extra, with')
print('# what they pull in. Made by `launch/tpu_vm.sh constraints > launch/constraints.txt`.')
if absent:
  print(f'# Not installed here (their requirer pins them): {", ".join(sorted(absent))}')
for name in sorted(pins):
  print(f'{name}=={pins[name][0]}')
PY
    ;;
  *) echo "unknown command $cmd" >&2; usage; exit 2 ;;
esac
