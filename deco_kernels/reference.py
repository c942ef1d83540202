"""Plain PyTorch compositions that define what every op computes.

These are the ``"torch"`` backend and the float64 references of the tests. Each function takes the same
arguments as the public op of the same name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "depthwise_conv2d",
    "depthwise_conv2d_layernorm",
    "scale_residual_max_pool",
    "upsample_add_conv",
]


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise 'same' convolution, stride 1.

    x: B x C x H x W; weight: C x 1 x kh x kw (odd kh, kw); bias: C or None. Returns B x C x H x W.
    """
    kh, kw = weight.shape[-2:]
    return F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])


def depthwise_conv2d_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """LayerNorm over the channels of the depthwise 'same' convolution, channels-last out (DECO's block front).

    x: B x C x H x W; weight: C x 1 x kh x kw (odd kh, kw); bias: C or None; norm_weight, norm_bias: C.
    Returns B x H x W x C: ``F.layer_norm(dwconv(x).permute(0, 2, 3, 1), (C,), norm_weight, norm_bias, eps)``.
    """
    y = depthwise_conv2d(x, weight, bias).permute(0, 2, 3, 1)
    return F.layer_norm(y, (x.shape[1],), norm_weight, norm_bias, eps)


def upsample_nearest(query: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling with PyTorch's legacy rule ``src = floor(dst * in / out)``."""
    return F.interpolate(query, size=size, mode="nearest")


def upsample_add_conv(
    query: torch.Tensor, memory: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """DECO's CIM front: ``dwconv(u + memory) + u`` with ``u = upsample_nearest(query, memory's H x W)``.

    query: B x C x Hq x Wq; memory: B x C x H x W; weight: C x 1 x kh x kw; bias: C or None.
    Returns B x C x H x W.
    """
    upsampled = upsample_nearest(query, tuple(memory.shape[-2:]))
    return depthwise_conv2d(upsampled + memory, weight, bias) + upsampled


def adaptive_max_pool2d(
    x: torch.Tensor, output_size: int | tuple[int, int], return_indices: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.adaptive_max_pool2d``: windows ``[floor(i*H/oh), ceil((i+1)*H/oh))``, first maximum wins."""
    return F.adaptive_max_pool2d(x, output_size, return_indices=return_indices)


def adaptive_avg_pool2d(x: torch.Tensor, output_size: int | tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` with the same window rule as the max pool."""
    return F.adaptive_avg_pool2d(x, output_size)


def scale_residual_max_pool(
    z: torch.Tensor, ffn: torch.Tensor, gamma: torch.Tensor, output_size: int | tuple[int, int]
) -> torch.Tensor:
    """DECO's CIM back end: ``F.adaptive_max_pool2d((z + gamma * ffn).permute(0, 3, 1, 2), output_size)`` in z's dtype.

    z, ffn: B x H x W x C; gamma: C. Returns B x C x OH x OW (channels-last memory format).
    """
    return F.adaptive_max_pool2d((z + gamma.to(z.dtype) * ffn).permute(0, 3, 1, 2), output_size)
