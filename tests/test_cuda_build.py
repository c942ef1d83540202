"""The CUDA extension deco_kernels._C was built, imports, and holds spill-free sm_80 and sm_90a SASS.

Skipped (visibly) only where setup.py itself skips the build: torch without CUDA, or no nvcc. The fatbin is
read with the cuobjdump that Triton's package carries (the system CUDA here has none).

Spills: ptxas puts spilled registers in per-thread local memory, addressed through the thread's stack frame,
so ``--dump-resource-usage`` reports them as a non-zero ``STACK`` (frame size) and ``LOCAL`` (local memory
bytes). Both must be 0 for every kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deco_kernels import _cuda
from deco_kernels._source_digest import source_digest

ROOT = Path(__file__).resolve().parents[1]
ARCHES = ("sm_80", "sm_90a")
PRIMITIVES = (
    "depthwise_conv2d_forward",
    "depthwise_conv2d_backward",
    "upsample_add_conv_forward",
    "upsample_add_conv_backward",
    "adaptive_max_pool2d_forward",
    "adaptive_max_pool2d_backward",
    "adaptive_avg_pool2d_forward",
    "adaptive_avg_pool2d_backward",
    "scale_residual_max_pool_forward",
    "scale_residual_max_pool_backward",
    "depthwise_conv2d_layernorm_forward",
    "depthwise_conv2d_layernorm_backward",
)
# Kernel families in csrc/kernels.cu and how many instantiations each must have per architecture:
# 3 dtypes, times 2 for the conv passes and weight-gradient kernels (plain input and upsample + memory input);
# the fp32-only reductions once.
KERNEL_FAMILIES = {
    "conv_layernorm_forward_kernel": 3,
    "conv_layernorm_backward_kernel": 3,
    "LayerNormParamGradReduceOp": 1,
    "conv_tiled_kernel": 6,
    "weight_grad_partials_kernel": 6,
    "ConvDirectOp": 6,
    "WeightGradDirectOp": 5,  # fp32 grad y with the stored CIM sum is the fp32 depthwise instantiation
    "WeightGradReduceOp": 1,
    "QueryGradOp": 3,
    "UpsampleSumStoreOp": 3,
    "MaxPoolForwardOp": 3,
    "MaxPoolBackwardOp": 3,
    "AvgPoolForwardOp": 3,
    "AvgPoolBackwardOp": 3,
    "ScaleResidualMaxPoolForwardOp": 3,
    "ScaleResidualMaxPoolBackwardOp": 3,
    "GammaGradPartialsOp": 3,
    "GammaGradReduceOp": 1,
}


def _nvcc_found() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or Path(home, "bin", "nvcc").exists()


pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or not _nvcc_found(),
    reason="the CUDA extension is only built when torch is a CUDA build and nvcc is found",
)


def _cuobjdump() -> Path:
    try:
        import triton
    except ImportError:
        pytest.skip("triton (which carries cuobjdump) is not installed")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"no cuobjdump in the triton package ({tool})")
    return tool


def _extension_path() -> Path:
    assert _cuda.is_available(), f"deco_kernels._C does not import: {_cuda.load_error()}"
    from deco_kernels import _C

    return Path(_C.__file__)


def test_extension_was_built_from_these_sources_and_registers_the_primitives():
    _extension_path()
    from deco_kernels import _C

    assert _C.source_digest == source_digest(ROOT / "csrc")
    for name in PRIMITIVES:
        assert hasattr(torch.ops.deco_kernels_C, name), f"torch.ops.deco_kernels_C.{name} is not registered"
        assert callable(getattr(_cuda, name))


def sass_arches(module: Path) -> list[str]:
    """The architectures of the SASS (ELF) entries in a module's fatbin, e.g. ["sm_80", "sm_90a"].

    Read from the entries' ``arch = ...`` headers, not from ``--list-elf``'s file names: the cuobjdump of
    CUDA 12.8 (carried by triton 3.6) names an sm_90a cubin "kernels.sm_90.cubin".
    """
    text = subprocess.run(
        [_cuobjdump(), "--dump-resource-usage", module], capture_output=True, text=True, check=True
    ).stdout
    return sorted(set(re.findall(r"^\s*arch = (sm_\w+)", text, flags=re.MULTILINE)))


def test_fatbin_holds_sm80_and_sm90a_sass():
    arches = sass_arches(_extension_path())
    assert arches == sorted(ARCHES), f"SASS for {arches}, expected {ARCHES}"


def _resource_usage() -> dict[str, dict[str, dict[str, int]]]:
    """{arch: {kernel symbol: {"REG": n, "STACK": n, "LOCAL": n, ...}}} from cuobjdump --dump-resource-usage."""
    text = subprocess.run(
        [_cuobjdump(), "--dump-resource-usage", _extension_path()], capture_output=True, text=True, check=True
    ).stdout
    usage: dict[str, dict[str, dict[str, int]]] = {}
    arch = function = None
    for line in text.splitlines():
        if match := re.match(r"\s*arch = (sm_\w+)", line):
            arch = match[1]
            usage.setdefault(arch, {})
        elif match := re.match(r"\s*Function (\S+):", line):
            function = match[1]
        elif function is not None and "REG:" in line:
            usage[arch][function] = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}
            function = None
    return usage


def test_every_kernel_is_compiled_for_both_arches_without_spills():
    usage = _resource_usage()
    assert sorted(usage) == sorted(ARCHES), f"resource usage for {sorted(usage)}, expected {ARCHES}"
    for arch, functions in usage.items():
        for family, count in KERNEL_FAMILIES.items():
            # Matched as a mangled identifier (its length, then the name), so that e.g. MaxPoolForwardOp does not
            # also count ScaleResidualMaxPoolForwardOp.
            found = [name for name in functions if f"{len(family)}{family}" in name]
            assert len(found) == count, f"{arch}: {len(found)} instantiations of {family}, expected {count}"
        assert len(functions) == sum(KERNEL_FAMILIES.values()), f"{arch}: unexpected kernels {sorted(functions)}"
        for name, resources in functions.items():
            assert resources["STACK"] == 0 and resources["LOCAL"] == 0, f"{arch} {name} spills: {resources}"
            assert resources["REG"] <= 128, f"{arch} {name} uses {resources['REG']} registers"


def test_setup_without_nvcc_says_so_in_one_line(tmp_path):
    """With no CUDA toolkit, setup.py builds without the extension and says why, in one line."""
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-cuda"))
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    notes = [line for line in result.stderr.splitlines() if line.startswith("deco-kernels:")]
    assert notes == [
        "deco-kernels: building without the CUDA extension: nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    ]
    assert result.stdout.strip().splitlines()[-1] == "deco-kernels"
