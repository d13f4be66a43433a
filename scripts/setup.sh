#!/usr/bin/env bash
# Create .venv and install moetune with its dev tools. torch is installed first and pinned, so that
# the resolver never swaps it for a build that pulls several GB of CUDA packages.
#   bash scripts/setup.sh            # TORCH_SPEC=torch==2.13.0 by default; EXTRAS=dev by default
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
echo "moetune installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
