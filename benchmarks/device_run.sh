#!/usr/bin/env bash
# On the device tool's GPU machine, from the repository root: install the carried wheels
# (benchmarks/device_wheels.sh), run `gpu_memory.sh <parts>` with the image's python3 and this
# tree's attrax, and copy the results and a log to $OUT, whatever the parts' outcome.
#   bash benchmarks/device_run.sh long            # one part per device call (each <= 10 min)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT" benchmarks/results
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/log"
PY=python3 bash benchmarks/gpu_memory.sh "$@" 2>&1 | tee -a "$OUT/log"
status=${PIPESTATUS[0]}
# what the parts write (each call empties $OUT, which takes at most 8 files)
cp benchmarks/results/*-cuda.json benchmarks/results/results-gpu.json \
  benchmarks/results/profile-w3-saliency*.txt benchmarks/gpu-h200.json "$OUT"/ 2>/dev/null
exit "$status"
