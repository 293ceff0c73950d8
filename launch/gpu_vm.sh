#!/usr/bin/env bash
# Run jaxvars on a single-host GPU VM (one or more NVIDIA GPUs; the batch is sharded over all).
# Usage: bash launch/gpu_vm.sh [config-arg] [workdir] [extra flags...]
#   bash launch/gpu_vm.sh paper,hm /data/runs/hm --config.data.manual_dir=/data/hm
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-paper}"; WORKDIR="${2:-/tmp/jaxvars-gpu}"; shift $(( $# > 2 ? 2 : $# )) || true
python3 -m venv .venv
.venv/bin/pip install -e . "jax[cuda12]"
.venv/bin/python -c "import jax; print('devices:', jax.devices())"
.venv/bin/python -m jaxvars.main --config="configs/joint.py:${PRESET}" --workdir="${WORKDIR}" "$@"
