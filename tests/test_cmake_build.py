"""CMakeLists.txt configures against the installed torch with sm_80 and sm_90a targets.

Configure only: compiling the module a second time would double the extension's share of CI's budget, and
the compiled result of the same sources and flags is checked by test_cuda_build.py. (A full standalone build,
`cmake -S . -B build && cmake --build build`, was run by hand with CMake 3.25 and 4.4; see the README.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(torch.version.cuda is None, reason="the extension needs a CUDA build of torch"),
    pytest.mark.skipif(
        shutil.which("cmake") is None or shutil.which("ninja") is None, reason="cmake or ninja is not installed"
    ),
    pytest.mark.skipif(
        shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(), reason="nvcc not found"
    ),
]


def test_cmake_configures_for_sm80_and_sm90a(tmp_path):
    build, output = tmp_path / "build", tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "TORCH_CUDA_ARCH_LIST"}
    result = subprocess.run(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            build,
            "-G",
            "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDECO_KERNELS_OUTPUT_DIR={output}",
        ],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rules = (build / "build.ninja").read_text()
    assert "arch=compute_80,code=sm_80" in rules and "arch=compute_90a,code=sm_90a" in rules
    assert "--use_fast_math" not in rules
    module = output / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    assert str(module) in rules, f"the module is not written to {module}"
    for source in ("kernels.cu", "cpu_kernels.cpp", "bindings.cpp"):
        assert f"csrc/{source}" in rules
