#!/usr/bin/env bash
# One-time set-up for parity, safe to re-run. Creates .venv (seeing the system's packages, so an existing
# CUDA or Ascend torch build is reused), installs the CPU wheel of torch only when no torch is importable,
# then installs parity with its test extras in editable mode. Each step says what it does; pip shows its
# own progress (set PIP_QUIET=1 for quiet pip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '\n==> [%s/3] %s\n' "$1" "$2"; }
start=$SECONDS
if [ ! -x .venv/bin/python ]; then
  step 1 "creating .venv with $PY (system site-packages visible)"
  "$PY" -m venv --system-site-packages .venv
else
  step 1 ".venv exists; reusing it"
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # torch==2.13.0 is the CPU wheel on this workplace's CPU machines; never let pip pick a CUDA build here.
  step 2 "installing torch 2.13.0 (CPU wheel, ~200 MB; takes a minute or two)"
  .venv/bin/pip install "torch==2.13.0"
else
  step 2 "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') is already importable; keeping it"
fi
step 3 "installing parity and its test extras (editable)"
.venv/bin/pip install -e ".[test]"
printf '\n==> done in %d s; try: .venv/bin/parity doctor\n' "$((SECONDS - start))"
