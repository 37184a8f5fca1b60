#!/usr/bin/env bash
# The GPU part of issue 18, from the repository root on a CUDA machine with the bench environment
# (benchmarks/README.md): [PY=python] bash benchmarks/gpu_memory.sh [part ...]
# Parts (default: all, in this order), each one command that fits a 10-minute device call:
#   harness      the harness on the GPU: parity gate, time and memory of W1-W3, W3 on the
#                fastest of the eager and folded-SDPA variants (results-gpu.json)
#   classifiers  C1/C2 (issue 13: C2's 5x on every class is FLOP-bound on the CPU), every
#                library's model on the GPU (classifiers-cuda.json)
#   long         a Llama-3-8B-shaped bfloat16 model built on the GPU with random weights:
#                saliency and input x gradient over 2,048- and 8,192-token prompts, 128 targets,
#                attrax within max_memory (SDPA: eager attention would store [heads, L, L] per
#                layer), Captum and Inseq on their first 4 targets, extrapolated (an
#                out-of-memory loop is recorded as such); long:N runs the N-token prompt alone
#                The long parts time each library on its parity call (--repeats 0: a call takes
#                minutes) and record a bfloat16 parity failure instead of stopping (one device
#                run keeps its numbers; the report marks the row).
#   long-ig      the same for integrated gradients (20 points) over 2,048 tokens, the loops on
#                their first 2 targets
#   long-lrp     AttnLRP over 2,048 tokens, attrax alone (LXT 2.1 needs transformers 4.x)
# Results in benchmarks/results/: results-gpu.json, classifiers-cuda.json and
# real-size-llama3-8b-*-cuda.json; copied into benchmarks/, `python -m benchmarks report` renders
# the real-size ones into docs/benchmarks-gpu.md.
# A dry run of the long parts on the CPU before spending device time, on a 2-layer miniature
# (tests/test_benchmarks_smoke.py runs it):
#   SHAPE=llama-tiny DEVICE=cpu LONG="40 56" TARGETS=6 RESULTS=/tmp/dry \
#     bash benchmarks/gpu_memory.sh long long-ig long-lrp
set -euo pipefail
PY=${PY:-python}
PARTS=${*:-harness classifiers long long-ig long-lrp}
# 120 GB (+16 GB of weights, within the H200's 140 GiB): at 8,192 tokens the planner estimates
# 108 GB for its smallest pass, 70 GB the 8B forward and 34 GB the results (128 x 8,192 x 4,096
# float32 and their labelled copy); its calibration over-estimates (docs/memory.md)
MEMORY=${ATTRAX_MAX_MEMORY:-120GB}
if [ -z "${ATTRAX_MAX_MEMORY:-}" ] && [ "${DEVICE:-cuda}" = cuda ] && command -v nvidia-smi >/dev/null; then
  # a smaller card (an H100's 80 GB): its memory less 24 GB (the 8B weights and a margin)
  card=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
  fits=$((card * 1048576 / 1000000000 - 24))
  ((fits < 120)) && MEMORY=${fits}GB
fi
SHAPE=${SHAPE:-llama3-8b} DEVICE=${DEVICE:-cuda} LONG=${LONG:-2048 8192} TARGETS=${TARGETS:-128}
RESULTS=${RESULTS:-benchmarks/results}
FIRST=${LONG%% *}  # the IG and AttnLRP prompt: the shorter one
mkdir -p "$RESULTS"
llama() {  # llama <tokens> <methods> <libraries> <first targets> <name> [real-size options]
  "$PY" -m benchmarks real-size --shape "$SHAPE" --device "$DEVICE" --attn sdpa --prompt "$1" \
    --target "$TARGETS" --methods "$2" --libraries "$3" --first-targets "$4" --repeats 0 \
    --max-memory "$MEMORY" --parity-dtype same --tolerance 5e-2 --on-parity-failure record \
    --out "$RESULTS/real-size-$SHAPE-$5-$DEVICE.json" "${@:6}"
}
for part in $PARTS; do
  case $part in
    harness) "$PY" -m benchmarks run --device "$DEVICE" --variants ;;
    classifiers) "$PY" -m benchmarks classifiers --device "$DEVICE" --threads "${THREADS:-8}" ;;
    long)
      for n in $LONG; do
        llama "$n" saliency,input_x_gradient attrax,captum,inseq 4 "$n"
      done ;;
    long:*) llama "${part#long:}" saliency,input_x_gradient attrax,captum,inseq 4 "${part#long:}" ;;
    # the loops 4 points per forward: all 20 at once ran out of the H200's memory (2026-12-04)
    long-ig) llama "$FIRST" integrated_gradients attrax,captum,inseq 2 "$FIRST-ig" \
      --internal-batch-size 4 ;;
    long-lrp) llama "$FIRST" lrp attrax 0 "$FIRST-lrp" ;;
    *) echo "gpu_memory.sh: unknown part '$part' (harness classifiers long long:N long-ig long-lrp)" >&2
       exit 2 ;;
  esac
done
