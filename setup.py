"""Builds the optional CUDA extension ``deco_kernels._C`` from csrc/ (see README: building).

The extension is built when torch is a CUDA build and nvcc is found (``CUDA_HOME``/``CUDA_PATH``, else ``nvcc``
on ``PATH``, else ``/usr/local/cuda``); otherwise the package installs without it and says why in one line.
``MAX_JOBS`` sets ninja's parallelism; ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0a"``) the SASS targets.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def _has_cuda_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists()


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, or None.

    torch's own guess takes ``dirname(dirname(which nvcc))``, which is wrong when ``nvcc`` on PATH is a wrapper
    script (as in /usr/local/bin here), so candidates are checked for the headers too.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if _has_cuda_toolkit(Path(explicit)) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [Path(nvcc).parent.parent, Path(nvcc).resolve().parent.parent]
    candidates.append(Path("/usr/local/cuda"))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if _has_cuda_toolkit(home):
            return str(home)
    return None


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc ``-gencode`` flags for a ``TORCH_CUDA_ARCH_LIST`` such as ``"8.0;9.0a"`` or ``"8.0 9.0+PTX"``.

    Spelled out here rather than left to torch.utils.cpp_extension so that "9.0a" yields real sm_90a SASS
    (``code=sm_90a``) in every supported torch version; "+PTX" adds PTX for forward compatibility.
    """
    flags = []
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+[af]?)(\+PTX)?", entry)
        if match is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot parse {entry!r} (expected e.g. '8.0', '9.0a', '9.0+PTX')")
        number = match[1] + match[2]
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if match[3]:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def csrc_digest() -> str:
    """deco_kernels/_source_digest.py's digest of csrc/, loaded by path (the package needs the module built)."""
    spec = importlib.util.spec_from_file_location("_source_digest", ROOT / "deco_kernels" / "_source_digest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest(ROOT / "csrc")


def cuda_extension_or_reason():
    """(ext_modules, cmdclass) for the extension, or a string saying why it is not built."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (install torch first, then pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    csrc = ROOT / "csrc"
    sources = sorted(str(p.relative_to(ROOT)) for p in list(csrc.glob("*.cpp")) + list(csrc.glob("*.cu")))
    extension = CUDAExtension(
        name="deco_kernels._C",
        sources=sources,
        include_dirs=[str(csrc)],
        extra_compile_args={
            # bindings.cpp stores the digest in the module, so that deco_kernels._cuda can refuse a stale build.
            "cxx": ["-O3", f"-DDECO_KERNELS_SOURCE_DIGEST={csrc_digest()}"],
            # No --use_fast_math: flushing denormals and approximate division would make the GPU results differ
            # from the CPU builds that CI tests, and the average pools divide.
            "nvcc": ["-O3", "-lineinfo", *gencode_flags(arch_list)],
        },
    )
    print(f"deco-kernels: building the CUDA extension with {cuda_home}/bin/nvcc for {arch_list}", file=sys.stderr)
    return [extension], {"build_ext": BuildExtension}


_built = cuda_extension_or_reason()
if isinstance(_built, str):
    print(f"deco-kernels: building without the CUDA extension: {_built}", file=sys.stderr)
    setup()
else:
    setup(ext_modules=_built[0], cmdclass=_built[1])
