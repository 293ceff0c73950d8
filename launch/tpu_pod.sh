#!/usr/bin/env bash
# Run jaxvars on a Cloud TPU pod slice (several TPU VM workers, e.g. v4-32, v5e-16): the same
# command on every worker, one process per worker; jax.distributed.initialize() finds the
# other workers itself (--distributed=on). Process 0 writes results, report and caches;
# every worker writes its part of the Orbax checkpoints.
#
# The workdir must be one directory every worker sees: a gs:// bucket (install gcsfs, see
# docs/running.md "Several hosts") or a shared file system. So must the data (each worker
# reads the whole dataset; a tfds data_dir on gs:// or a copy on every worker).
#
# From your machine (the repository cloned on every worker first, e.g. with --worker=all):
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command \
#     "cd jaxvars && bash launch/tpu_pod.sh paper,hm gs://BUCKET/runs/hm \
#      --config.data.manual_dir=/data/hm"
# Usage (on every worker): bash launch/tpu_pod.sh [config-arg] [workdir] [extra flags...]
exec bash "$(dirname "$0")/run_vm.sh" tpu "${1:-paper}" "${2:-/tmp/jaxvars}" \
  --distributed=on "${@:3}"
