"""Fused kernels for DECO: depthwise convolution, the CIM's upsample-add-conv, adaptive pooling."""

from deco_kernels.backend import available_backends, get_backend, resolve_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "use_backend",
]
