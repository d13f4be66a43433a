#!/usr/bin/env bash
# Create .venv and install moetune with its dev tools, bitsandbytes (4-bit loading) and DeepSpeed.
# torch is installed first and pinned, so the resolver never swaps it for a build that pulls several GB
# of CUDA packages; DeepSpeed builds from source against that torch (--no-build-isolation), its ops
# compile on first use.
#   bash scripts/setup.sh                     # TORCH_SPEC=torch==2.13.0, EXTRAS=dev,quant, WITH_DEEPSPEED=1
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh   # GPU
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,quant}
WITH_DEEPSPEED=${WITH_DEEPSPEED:-1}
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet)
"${pip[@]}" --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
"${pip[@]}" $TORCH_SPEC
"${pip[@]}" -e ".[${EXTRAS}]"
if [[ "$WITH_DEEPSPEED" == 1 ]]; then
  "${pip[@]}" --no-build-isolation "deepspeed>=0.17"
fi
echo "moetune installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
