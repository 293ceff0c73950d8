#!/usr/bin/env bash
# Run jaxvars on a single-host Cloud TPU VM (e.g. v4-8, v5e-8).
# Usage (on the TPU VM): bash launch/tpu_vm.sh [config-arg] [workdir] [extra flags...]
# Multi-host slices (several VMs): launch/tpu_pod.sh.
exec bash "$(dirname "$0")/run_vm.sh" tpu "$@"
