#!/usr/bin/env bash
# Run jaxvars as N processes on this machine (CPU devices), the multi-controller path of a
# TPU pod or SLURM job without a cluster: process i gets --process_id=i, all reach process
# 0's coordinator on 127.0.0.1. Each process's log goes to WORKDIR.process<i>.log; the
# script exits with the first failure's status.
# Usage: bash launch/local_processes.sh N [config-arg] [workdir] [extra flags...]
#   bash launch/local_processes.sh 2 tiny /tmp/jaxvars_2p
set -uo pipefail
cd "$(dirname "$0")/.."
N="${1:?number of processes}"; PRESET="${2:-tiny}"; WORKDIR="${3:-/tmp/jaxvars}"
shift $(( $# > 3 ? 3 : $# ))
PY="${PYTHON:-.venv/bin/python}"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
pids=()
for ((i = 0; i < N; i++)); do
  "$PY" -m jaxvars.main --config="configs/joint.py:${PRESET}" --workdir="${WORKDIR}" \
    --coordinator_address="127.0.0.1:${PORT}" --num_processes="${N}" --process_id="${i}" \
    "$@" > "${WORKDIR}.process${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || { rc=$?; [ "${status}" -eq 0 ] && status=${rc}; }
done
echo "logs: ${WORKDIR}.process*.log"
exit "${status}"
