#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU machine lacks (Python 3.12, no network there) into
# .whl/ (git-ignored). Name `.whl` in the device tool's `carry`; scripts/gpu_run.sh installs what it finds there.
# Today that is pycocotools, which `deco demo` / `deco eval` need for COCO evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "pycocotools>=2.0.7"
ls -la .whl
