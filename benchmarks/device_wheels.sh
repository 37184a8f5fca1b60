#!/usr/bin/env bash
# Here, before a GPU run through the device tool (whose machine reaches no registry): download the
# bench packages its image lacks (captum, inseq, typeguard; pure Python) and the bench venv's
# transformers (5.24; the image has 5.17) as Python 3.12 wheels
# into .whl/ (git-ignored), which the run carries: `bash benchmarks/device_wheels.sh`, then
# device run with carry [".whl"] and command `bash benchmarks/device_run.sh <parts>`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .whl captum==0.9.0 inseq==0.7.0 typeguard==2.13.3 transformers==5.24.0
ls .whl
