#!/usr/bin/env bash
# The GPU part of issue 18 in one command, from the repository root on a CUDA machine with the
# bench environment (benchmarks/README.md): bash benchmarks/gpu_memory.sh [python]
#   1. the harness on the GPU (parity gate, time and memory of every workload);
#   2. the classifier workloads C1/C2 (issue 13: C2's 5x on every class is FLOP-bound on the CPU)
#      on the GPU, every library's model there: benchmarks/results/classifiers-cuda.json;
#   3. a Llama-3-8B-shaped bfloat16 model built on the GPU with random weights, saliency over
#      2,048- and 8,192-token prompts with 128 targets, attrax with max_memory (SDPA: eager
#      attention would store [heads, L, L] per layer), Captum and Inseq on their first 4 targets,
#      extrapolated (an out-of-memory baseline is recorded as such).
# Results: benchmarks/results/results-gpu.json, classifiers-cuda.json and llama3-8b-*.json.
set -euo pipefail
PY=${1:-python}
mkdir -p benchmarks/results
"$PY" -m benchmarks run --device cuda
"$PY" -m benchmarks classifiers --device cuda --threads "${THREADS:-8}"
for n in 2048 8192; do
  "$PY" -m benchmarks real-size --shape llama3-8b --device cuda --attn sdpa \
    --prompt "$n" --target 128 --methods saliency --first-targets 4 --repeats 1 \
    --max-memory "${ATTRAX_MAX_MEMORY:-60GB}" --tolerance 5e-2 \
    --out "benchmarks/results/llama3-8b-$n.json"
done
