"""CMakeLists.txt builds the extension standalone against the installed torch, for sm_80 and sm_90a.

The module is built into a temporary folder (about a minute on 2 cores), its fatbin is listed, and it is loaded
in a separate process (loading it here would register the ``deco_kernels_C`` ops a second time beside the
pip-built module) where one of its CPU kernels is compared with PyTorch.
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
from test_cuda_build import ARCHES, sass_arches

from deco_kernels._source_digest import source_digest

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


def test_cmake_builds_a_working_module_for_sm80_and_sm90a(tmp_path):
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

    build_result = subprocess.run(
        ["cmake", "--build", build, "-j", "2"], env=env, check=False, capture_output=True, text=True, timeout=900
    )
    assert build_result.returncode == 0, build_result.stdout[-3000:] + build_result.stderr[-3000:]
    arches = sass_arches(module)
    assert arches == sorted(ARCHES), f"SASS for {arches}, expected {ARCHES}"

    check = f"""
import importlib.util, torch, torch.nn.functional as F
spec = importlib.util.spec_from_file_location("_C", {str(module)!r})
built = importlib.util.module_from_spec(spec)
spec.loader.exec_module(built)
print(built.source_digest)
x = torch.randn(2, 5, 7, 9)
weight, bias = torch.randn(5, 1, 3, 7), torch.randn(5)
y = torch.ops.deco_kernels_C.depthwise_conv2d_forward(x, weight, bias)
expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=(1, 3), groups=5)
print(float((y.double() - expected).abs().max() / expected.abs().max().clamp(min=1)))
"""
    loaded = subprocess.run([sys.executable, "-c", check], check=False, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    digest, error = loaded.stdout.split()[-2:]
    assert digest == source_digest(ROOT / "csrc"), "the CMake-built module records another source digest"
    assert float(error) <= 2e-5, f"CMake-built depthwise conv differs: {loaded.stdout}"
