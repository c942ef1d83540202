"""The public ops: one torch.library custom op per op, dispatching to the Triton or CUDA primitives.

Importing this package registers every ``deco_kernels::*`` custom op.
"""

from deco_kernels.ops.adaptive_pool import adaptive_avg_pool2d, adaptive_max_pool2d
from deco_kernels.ops.depthwise_conv2d import depthwise_conv2d
from deco_kernels.ops.depthwise_conv2d_layernorm import depthwise_conv2d_layernorm
from deco_kernels.ops.scale_residual_max_pool import scale_residual_max_pool
from deco_kernels.ops.upsample_add_conv import upsample_add_conv

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "depthwise_conv2d",
    "depthwise_conv2d_layernorm",
    "scale_residual_max_pool",
    "upsample_add_conv",
]
