#!/usr/bin/env bash
# Installs deco-kernels and everything it needs into the current Python environment, building the CUDA
# extension deco_kernels._C when torch is a CUDA build and nvcc is found (see README: building).
set -euo pipefail
cd "$(dirname "$0")/.."
# The build runs without isolation so that it compiles against the torch installed here; its build-time
# requirements are therefore installed first.
python -m pip install --quiet "torch>=2.6" "torchvision>=0.21" setuptools wheel ninja pybind11
python -m pip install --quiet --no-build-isolation -e ".[test]"
