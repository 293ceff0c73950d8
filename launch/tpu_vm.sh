#!/usr/bin/env bash
# Run jaxvars on a single-host Cloud TPU VM (e.g. v4-8, v5e-8): one process drives every
# local TPU core; the batch is sharded over them by the same jitted step.
# Usage (on the TPU VM): bash launch/tpu_vm.sh [config-arg] [workdir] [extra flags...]
# Multi-host slices (several VMs) are not supported yet: main.py does not call
# jax.distributed.initialize() and the input pipeline is not split per host.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-paper}"; WORKDIR="${2:-/tmp/jaxvars-tpu}"; shift $(( $# > 2 ? 2 : $# )) || true
python3 -m venv .venv
.venv/bin/pip install -e . "jax[tpu]"
.venv/bin/python -c "import jax; print('devices:', jax.devices())"
.venv/bin/python -m jaxvars.main --config="configs/joint.py:${PRESET}" --workdir="${WORKDIR}" "$@"
