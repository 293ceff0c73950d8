#!/usr/bin/env bash
# Run jaxvars on a single-host GPU VM (one or more NVIDIA GPUs).
# Usage: bash launch/gpu_vm.sh [config-arg] [workdir] [extra flags...]
#   bash launch/gpu_vm.sh paper,hm /data/runs/hm --config.data.manual_dir=/data/hm
exec bash "$(dirname "$0")/run_vm.sh" cuda12 "$@"
