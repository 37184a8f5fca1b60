#!/usr/bin/env bash
# On the device tool's GPU machine, from the repository root: install the carried wheels
# (benchmarks/device_wheels.sh), run `gpu_memory.sh <part>` for each part in turn with the image's
# python3 and this tree's attrax, and copy the results and a log to $OUT after each part.
#   bash benchmarks/device_run.sh long:2048 long:8192 long-ig harness
# DEADLINE (seconds, default 570): each part runs with the time left before it, and none starts
# with less than a minute left, so that one 10-minute device call ends with what finished in it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device}
DEADLINE=${DEADLINE:-570}
export RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$OUT" "$RESULTS"
WHEELS=${WHEELS:-.whl}  # the carried wheels
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# fewer stranded blocks between passes of different sizes (the 8B runs fill most of the card)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
log="$OUT/log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >"$log" 2>&1
cat "$log"
status=0
for part in "${@:-long}"; do
  left=$((DEADLINE - SECONDS))
  if ((left < 60)); then
    echo "device_run.sh: $part not started, ${left} s left" | tee -a "$log"
    status=124
    continue
  fi
  echo "== $part (${SECONDS} s in, ${left} s left)" | tee -a "$log"
  PY=python3 timeout -k 10 "$left" bash benchmarks/gpu_memory.sh "$part" 2>&1 | tee -a "$log"
  code=${PIPESTATUS[0]}
  echo "== $part: exit $code at ${SECONDS} s" | tee -a "$log"
  ((code)) && status=$code
  # after each part: a later part cut short keeps this one's files ($OUT takes 8 at most)
  cp "$RESULTS"/*-cuda.json "$RESULTS"/results-gpu.json "$RESULTS"/profile-w3-saliency*.txt \
    benchmarks/gpu-h200.json "$OUT"/ 2>/dev/null
done
exit "$status"
