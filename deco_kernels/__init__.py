"""Fused kernels for DECO: depthwise convolution (alone and with the LayerNorm after it), the CIM's
upsample-add-conv, adaptive pooling, and the CIM's layer-scaled residual with max pooling
(scale_residual_max_pool).

Every op runs on one of three backends ("triton", "cuda", "torch"), chosen per call by its ``backend=``
keyword, else by the process-wide setting (:func:`set_backend`, :func:`use_backend`, the
``DECO_KERNELS_BACKEND`` environment variable), else automatically; see :mod:`deco_kernels.backend`.
Drop-in modules are in :mod:`deco_kernels.nn`.
"""

from deco_kernels.backend import available_backends, get_backend, resolve_backend, set_backend, use_backend
from deco_kernels.ops import (
    adaptive_avg_pool2d,
    adaptive_max_pool2d,
    depthwise_conv2d,
    depthwise_conv2d_layernorm,
    scale_residual_max_pool,
    upsample_add_conv,
)

__version__ = "0.1.0"

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "available_backends",
    "depthwise_conv2d",
    "depthwise_conv2d_layernorm",
    "get_backend",
    "resolve_backend",
    "scale_residual_max_pool",
    "set_backend",
    "upsample_add_conv",
    "use_backend",
]
