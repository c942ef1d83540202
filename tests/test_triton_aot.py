"""Ahead-of-time compilation of every Triton kernel at every tuning configuration for sm_80 and sm_90a.

The interpreter never runs Triton's compiler, so this is what catches compile errors, register spills and
shared-memory overuse without a GPU. Each module of deco_kernels/triton lists its kernels in ``aot_cases()``.
The tests here run with TRITON_INTERPRET=1 (kernels decorated then are interpreter objects that cannot be
compiled), so one subprocess without it compiles every case and reads each cubin's resource usage with the
cuobjdump that Triton bundles; the tests check its report, one test per case, and print a table (``-s``).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ARCHS = {"sm_80": 80, "sm_90a": 90}  # GPUTarget("cuda", 90, 32) compiles for sm_90a
SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
COMPILE_TIMEOUT_S = 900


def _modules():
    import deco_kernels.triton

    return [importlib.import_module(f"deco_kernels.triton.{info.name}")
            for info in pkgutil.iter_modules(deco_kernels.triton.__path__) if not info.name.startswith("_")]


def _case_ids() -> list[str]:
    return [f"{module.__name__.rsplit('.', 1)[-1]}:{case[0]}" for module in _modules() for case in module.aot_cases()]


def _compile_all() -> dict[str, dict[str, dict]]:
    """{case id: {arch: {"REG", "SHARED", "LOCAL", "STACK"} or {"error": message}}}; run without the interpreter."""
    import triton
    from triton.backends.compiler import GPUTarget

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    report: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = Path(tmp) / "kernel.cubin"
        ptx_path = Path(tmp) / "kernel.ptx"
        for module in _modules():
            for name, fn, signature, constexprs, num_warps in module.aot_cases():
                case_report = report.setdefault(f"{module.__name__.rsplit('.', 1)[-1]}:{name}", {})
                for arch, capability in ARCHS.items():
                    try:
                        compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs),
                                                  target=GPUTarget("cuda", capability, 32),
                                                  options={"num_warps": num_warps})
                    except Exception as error:  # reported per case by the test below
                        case_report[arch] = {"error": f"{type(error).__name__}: {error}"}
                        continue
                    cubin_path.write_bytes(compiled.asm["cubin"])
                    text = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin_path)],
                                          check=True, capture_output=True, text=True).stdout
                    usage = {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", text)}
                    # A stack frame is not necessarily a spill; ptxas -v says how many bytes are spilled.
                    ptx_path.write_text(compiled.asm["ptx"])
                    arch_flag = re.search(r"^\.target\s+(\w+)", compiled.asm["ptx"], re.MULTILINE).group(1)
                    log = subprocess.run([str(tools / "ptxas"), "-v", f"--gpu-name={arch_flag}", str(ptx_path),
                                          "-o", str(Path(tmp) / "verbose.cubin")],
                                         check=True, capture_output=True, text=True).stderr
                    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
                    if "REG" not in usage or spills is None:
                        case_report[arch] = {"error": f"no resource usage in: {text!r} {log!r}"}
                        continue
                    usage["SPILL_STORES"], usage["SPILL_LOADS"] = int(spills.group(1)), int(spills.group(2))
                    usage["SHARED"] = max(usage.get("SHARED", 0), compiled.metadata.shared)
                    case_report[arch] = usage
    return report


@pytest.fixture(scope="module")
def report():
    root = Path(__file__).parent.parent
    # PYTHONPATH: the subprocess compiles this checkout's kernels, whatever deco_kernels is installed.
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, __file__], env=environment, capture_output=True, text=True,
                            timeout=COMPILE_TIMEOUT_S, cwd=root)
    assert result.returncode == 0, f"compile subprocess failed:\n{result.stderr[-4000:]}"
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    print("\n" + f"{'kernel':<64} {'arch':<7} {'regs':>5} {'shared':>7} {'local':>6} {'stack':>6} {'spills':>7}")
    for case, per_arch in compiled.items():
        for arch, usage in per_arch.items():
            if "error" in usage:
                print(f"{case:<64} {arch:<7} ERROR {usage['error'][:60]}")
            else:
                print(f"{case:<64} {arch:<7} {usage['REG']:>5} {usage['SHARED']:>7} {usage.get('LOCAL', 0):>6} "
                      f"{usage.get('STACK', 0):>6} {usage['SPILL_STORES'] + usage['SPILL_LOADS']:>7}")
    return compiled


def test_every_module_lists_its_kernels():
    modules = {module.__name__.rsplit(".", 1)[-1]: module for module in _modules()}
    assert {"depthwise_conv2d", "upsample_add_conv"} <= set(modules)
    for name, module in modules.items():
        assert module.aot_cases(), f"{name}.aot_cases() is empty"


@pytest.mark.parametrize("case", _case_ids())
def test_compiles_without_spills(case, report):
    assert case in report, f"{case} was not compiled"
    for arch in ARCHS:
        usage = report[case][arch]
        assert "error" not in usage, f"{arch}: {usage.get('error')}"
        assert usage["SPILL_STORES"] == usage["SPILL_LOADS"] == 0, f"{arch}: register spills {usage}"
        assert usage.get("LOCAL", 0) == 0, f"{arch}: local memory {usage}"
        assert usage["SHARED"] <= SHARED_MEMORY_LIMIT[arch], f"{arch}: {usage['SHARED']} bytes of shared memory"


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
