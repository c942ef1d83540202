#!/usr/bin/env bash
# Build, on this CPU machine, the CUDA extension for the GPU machine's Python 3.12 and torch 2.11 (CUDA 13.0):
# deco_kernels/_C.cpython-312-x86_64-linux-gnu.so (git-ignored). Name it in the first device call's `carry`
# and scripts/gpu_run.sh uses it instead of building there (minutes of device time). The module records the
# digest of csrc/ it was built from; deco_kernels refuses it once csrc/ changes, and gpu_run.sh then builds.
#
#   bash scripts/device_module.sh      # about 4 minutes on 2 cores; the venv is kept for the next build
#
# DEVICE_PYTHON: a Python 3.12 interpreter (default: python3.12 on PATH, else pyenv's newest 3.12);
# DEVICE_TORCH: the torch requirement (default torch==2.11.*, the GPU machine's); DEVICE_VENV: where the venv goes.
set -euo pipefail
cd "$(dirname "$0")/.."

# The first candidate that runs and is 3.12 (a pyenv shim on PATH may exist and still fail to run).
python312=
for candidate in ${DEVICE_PYTHON:-python3.12 $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -rV)}; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
        python312=$candidate
        break
    fi
done
[[ -n $python312 ]] || { echo "no working Python 3.12 found${DEVICE_PYTHON:+ (DEVICE_PYTHON=$DEVICE_PYTHON)}: set DEVICE_PYTHON" >&2; exit 1; }
venv=${DEVICE_VENV:-/tmp/deco-device-py312}
[[ -x $venv/bin/python ]] || "$python312" -m venv "$venv"
log=/tmp/deco-device-module.log
"$venv/bin/python" -m pip install -q "${DEVICE_TORCH:-torch==2.11.*}" setuptools ninja pybind11 numpy >"$log" 2>&1 \
    || { tail -20 "$log"; exit 1; }
"$venv/bin/python" - <<'PY'
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
print(f"building for torch {torch.__version__} (CUDA {torch.version.cuda})")
PY
MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" setup.py build_ext --inplace >>"$log" 2>&1 || { tail -20 "$log"; exit 1; }
module=$(ls deco_kernels/_C.cpython-312-*.so)
# The module loads against this torch and records the digest of the sources as they are now.
"$venv/bin/python" - "$module" "$("$venv/bin/python" deco_kernels/_source_digest.py csrc)" <<'PY'
import importlib.util, sys
import torch  # noqa: F401  (the module links against torch's libraries)
path, digest = sys.argv[1:]
spec = importlib.util.spec_from_file_location("_C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.source_digest == digest, f"{path} records digest {module.source_digest}, csrc/ has {digest}"
print(f"{path}: loads; built from csrc/ as it is now (digest {digest[:12]})")
PY
echo "carry it: run(\"bash scripts/gpu_run.sh test\", carry=[\"$module\"])"
