#!/usr/bin/env bash
# The headline table over seeds: run the same presets with --config.seed=0,1,2 (model init,
# item split of the defence, triplets, defence training, rand draws; the leave-one-out split
# and its negatives stay fixed by config.data.split_seed), then summarise mean and range.
# Usage: bash launch/seeds.sh PRESETS BASE_WORKDIR [extra flags...]
#   e.g. bash launch/seeds.sh cpu,hm /tmp/hm_seeds
set -euo pipefail
cd "$(dirname "$0")/.."
PRESETS="$1"; BASE="$2"; shift 2
PY="${PYTHON:-.venv/bin/python}"
DIRS=()
for SEED in 0 1 2; do
  "$PY" -m jaxvars.main --config="configs/joint.py:${PRESETS}" --workdir="${BASE}/seed${SEED}" \
      --config.seed="${SEED}" "$@"
  DIRS+=("${BASE}/seed${SEED}")
done
"$PY" -m jaxvars.report.seeds --workdirs="$(IFS=,; echo "${DIRS[*]}")" --out="${BASE}/seeds.md"
