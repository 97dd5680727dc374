#!/usr/bin/env bash
# Create .venv (if needed) and install gpuwatch into it, non-editable, with the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)" >&2
  $PY -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# Pinned first: an open-ended torch requirement can pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)" >&2
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
echo "[setup] installing gpuwatch and its dependencies" >&2
.venv/bin/python -m pip install -q --upgrade ".[test,train]"
