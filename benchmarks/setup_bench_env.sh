#!/usr/bin/env bash
# Create/refresh the benchmark venv (default: <repo>/.bench-venv, git-ignored) with
# torch 2.13.0 (CPU) + transformers 5.24.0 + captum 0.9.0 + inseq 0.7.0 + attrax (editable).
# Idempotent: re-running only installs what is missing.  Needs PyPI (no model hub).
#
#   bash benchmarks/setup_bench_env.sh            # or BENCH_VENV=/some/path bash ...
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
VENV="${BENCH_VENV:-$REPO/.bench-venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# 1. torch first, exactly this spec: it resolves to the CPU wheel on local disk.  Any other spec
#    (or letting a dependency pull torch) downloads the multi-GB CUDA build.
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    "${PIP[@]}" install "torch==2.13.0"
fi

# 2. transformers, captum and inseq's real runtime dependencies (pinned).
"${PIP[@]}" install -r "$HERE/requirements-bench.txt" -c "$HERE/constraints-bench.txt"

# 3. inseq without its declared dependencies: inseq 0.7.0 requires nvidia-*-cu11 (several GB) on
#    Linux plus security-floor pins it never imports (aiohttp, authlib, cryptography, marshmallow,
#    requests, tornado, urllib3).  `pip check` therefore reports those as missing: expected.
if ! "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("inseq") != "0.7.0")' 2>/dev/null; then
    "${PIP[@]}" install --no-deps "inseq==0.7.0"
fi
# 3b. interpreto 0.5.2 (classifier workloads), also --no-deps: its metadata pulls bitsandbytes and
#     docs tooling; its runtime imports (nnsight, beartype, nltk, scikit-learn, scipy, jaxtyping
#     <= 0.2.36) are pinned in requirements-bench.txt, torch held by a constraint.
if ! "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("interpreto") != "0.5.2")' 2>/dev/null; then
    "${PIP[@]}" install --no-deps "interpreto==0.5.2"
fi

# 3c. EleutherAI's knowledge-neurons 0.0.2 (benchmarks/neurons.py), --no-deps: its metadata pulls
#     seaborn, and an unpinned torch and transformers; it imports einops (attrax's) and tqdm.
if ! "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("knowledge-neurons") != "0.0.2")' 2>/dev/null; then
    "${PIP[@]}" install --no-deps "knowledge-neurons==0.0.2"
fi

# 4. attrax itself (editable) so both sides run in the same process; its deps that are missing.
"${PIP[@]}" install -e "$REPO"

# 5. Smoke check: imports, versions, and no CUDA wheels.
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md
import captum, inseq, torch, transformers  # noqa: F401
want = {"torch": "2.13.0", "transformers": "5.24.0", "captum": "0.9.0", "inseq": "0.7.0"}
got = {k: md.version(k) for k in want}
bad = {k: v for k, v in got.items() if not v.startswith(want[k])}
assert not bad, f"unexpected versions: {bad}"
nvidia = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia"))
assert not nvidia, f"CUDA wheels crept in: {nvidia}"
print("bench env OK:", ", ".join(f"{k} {v}" for k, v in got.items()), f"(torch {torch.__version__})")
PYEOF
