#!/usr/bin/env bash
# One-time set-up for parity, safe to re-run. Creates .venv (seeing the system's packages, so an existing
# CUDA or Ascend torch build is reused), installs the CPU wheel of torch only when no torch is importable,
# then installs parity with its test extras in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # torch==2.13.0 is the CPU wheel on this workplace's CPU machines; never let pip pick a CUDA build here.
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[test]"
