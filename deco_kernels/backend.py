"""Which implementation runs each op: ``"triton"``, ``"cuda"`` or ``"torch"``.

The choice is made per call from (in order) the op's ``backend=`` keyword, the process-wide setting
(:func:`set_backend`, :func:`use_backend`, or the ``DECO_KERNELS_BACKEND`` environment variable) and, when
that is ``"auto"``, the best backend available for the tensor's device. Whatever is chosen is logged once
per (device type, backend) on the ``deco_kernels`` logger and can be asked for with
:func:`resolve_backend`, so a CPU fallback is never silent; where ``"auto"`` on a GPU cannot use the CUDA
extension, the log says why (a warning when the extension is a stale build).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator

import torch

__all__ = [
    "BACKENDS",
    "available_backends",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "use_backend",
]

BACKENDS = ("triton", "cuda", "torch")
_SETTINGS = BACKENDS + ("auto",)

logger = logging.getLogger("deco_kernels")

_setting: str = "auto"
# (device type, requested, op) -> backend, filled (and logged) on the first resolution of each key.
_resolved: dict[tuple[str, str, str], str] = {}


def _check_name(name: str, argument: str) -> str:
    if not isinstance(name, str) or name not in _SETTINGS:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, _SETTINGS))}; got {name!r}")
    return name


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def cuda_extension_available() -> bool:
    """True when the compiled ``deco_kernels._C`` extension imports."""
    from deco_kernels import _cuda

    return _cuda.is_available()


def available_backends(device: torch.device | str) -> tuple[str, ...]:
    """The backends that can run on ``device``, best first."""
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if cuda_extension_available():
            found.append("cuda")
        if _triton_installed() and not triton_interpreted():
            found.append("triton")
    elif device.type == "cpu":
        # The CUDA kernel bodies are also compiled for the CPU (csrc/), and Triton's interpreter runs the
        # Triton kernels on CPU tensors: both exist for testing, so "auto" never picks them on the CPU.
        if cuda_extension_available():
            found.append("cuda")
        if _triton_installed() and triton_interpreted():
            found.append("triton")
    found.append("torch")
    return tuple(found)


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        return available_backends(device)[0]
    return "torch"


def set_backend(name: str) -> None:
    """Set the process-wide backend: ``"triton"``, ``"cuda"``, ``"torch"`` or ``"auto"`` (the default)."""
    global _setting
    _setting = _check_name(name, "backend")


def get_backend() -> str:
    """The process-wide setting (``"auto"`` unless changed)."""
    return _setting


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another process-wide backend setting."""
    global _setting
    previous = _setting
    _setting = _check_name(name, "backend")
    try:
        yield
    finally:
        _setting = previous


def resolve_backend(device: torch.device | str, backend: str | None = None, *, op: str = "op") -> str:
    """The concrete backend that runs ``op`` on ``device``.

    Raises ``RuntimeError`` when an explicitly requested backend cannot run there (for example ``"cuda"``
    without the compiled extension, or ``"triton"`` on CPU tensors without ``TRITON_INTERPRET=1``).
    """
    requested = _check_name(backend, "backend") if backend is not None else _setting
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not torch.compiler.is_compiling():
        # Every kernel call asks: answer from the cache (what can run where does not change in a process).
        chosen = _resolved.get((device_type, requested, op))
        if chosen is not None:
            return chosen
    return _resolve(device_type, requested, op)


# Under torch.compile this runs once at trace time (availability probes and logging are not traceable) and its
# answer becomes a constant of the graph; the graph is guarded on the setting that ``requested`` was read from.
@torch.compiler.assume_constant_result
def _resolve(device_type: str, requested: str, op: str) -> str:
    device = torch.device(device_type)
    chosen = _auto(device) if requested == "auto" else requested
    if chosen not in available_backends(device):
        raise RuntimeError(
            f"deco_kernels: backend {chosen!r} cannot run {op} on {device_type} tensors here; "
            f"available: {', '.join(available_backends(device))}"
        )
    key = (device_type, requested, op)
    if key not in _resolved:
        _resolved[key] = chosen
        how, level = ("auto" if requested == "auto" else "requested"), logging.INFO
        if requested == "auto" and device_type == "cuda" and chosen != "cuda":
            from deco_kernels import _cuda

            # The best GPU backend is missing: say why, and loudly where a build no longer matches its sources.
            how += f"; the CUDA extension is not available: {_cuda.load_error()}"
            level = logging.WARNING if _cuda.is_stale() else logging.INFO
        logger.log(level, "deco_kernels: %s on %s runs the %r backend (%s)", op, device_type, chosen, how)
    return chosen


_env = os.environ.get("DECO_KERNELS_BACKEND")
if _env:
    set_backend(_check_name(_env, "DECO_KERNELS_BACKEND"))
