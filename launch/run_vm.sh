#!/usr/bin/env bash
# Shared by gpu_vm.sh and tpu_vm.sh: install jaxvars with a JAX accelerator extra in a venv,
# show the devices, run jaxvars.main. One process drives every local accelerator; the batch
# is sharded over all of them by the same jitted step.
# Usage: bash launch/run_vm.sh JAX_EXTRA [config-arg] [workdir] [extra flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
JAX_EXTRA="$1"; PRESET="${2:-paper}"; WORKDIR="${3:-/tmp/jaxvars}"
shift $(( $# > 3 ? 3 : $# ))
python3 -m venv .venv
.venv/bin/pip install -e . "jax[${JAX_EXTRA}]"
.venv/bin/python -c "import jax; print('devices:', jax.devices())"
.venv/bin/python -m jaxvars.main --config="configs/joint.py:${PRESET}" --workdir="${WORKDIR}" "$@"
