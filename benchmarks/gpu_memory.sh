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
#                out-of-memory loop is recorded as such)
#   long-ig      the same for integrated gradients (20 points) over 2,048 tokens, the loops on
#                their first 2 targets
#   long-lrp     AttnLRP over 2,048 tokens, attrax alone (LXT 2.1 needs transformers 4.x)
# Results in benchmarks/results/: results-gpu.json, classifiers-cuda.json and
# real-size-llama3-8b-*-cuda.json; copied into benchmarks/, `python -m benchmarks report` renders
# the real-size ones into docs/benchmarks-gpu.md.
set -euo pipefail
PY=${PY:-python}
PARTS=${*:-harness classifiers long long-ig long-lrp}
MEMORY=${ATTRAX_MAX_MEMORY:-60GB}
mkdir -p benchmarks/results
llama() {  # llama <tokens> <methods> <libraries> <first targets> <name>
  "$PY" -m benchmarks real-size --shape llama3-8b --device cuda --attn sdpa --prompt "$1" \
    --target 128 --methods "$2" --libraries "$3" --first-targets "$4" --repeats 1 \
    --max-memory "$MEMORY" --parity-dtype same --tolerance 5e-2 \
    --out "benchmarks/results/real-size-llama3-8b-$5-cuda.json"
}
for part in $PARTS; do
  case $part in
    harness) "$PY" -m benchmarks run --device cuda --variants ;;
    classifiers) "$PY" -m benchmarks classifiers --device cuda --threads "${THREADS:-8}" ;;
    long)
      for n in 2048 8192; do
        llama "$n" saliency,input_x_gradient attrax,captum,inseq 4 "$n"
      done ;;
    long-ig) llama 2048 integrated_gradients attrax,captum,inseq 2 2048-ig ;;
    long-lrp) llama 2048 lrp attrax 0 2048-lrp ;;
    *) echo "gpu_memory.sh: unknown part '$part' (harness classifiers long long-ig long-lrp)" >&2
       exit 2 ;;
  esac
done
