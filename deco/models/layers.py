"""Building blocks shared by the encoder and decoder, with the ``kernels="stock"|"fused"`` switch.

``"stock"`` builds plain PyTorch modules (``nn.Conv2d(groups=C)``, nearest ``F.interpolate``,
``F.adaptive_max_pool2d``); ``"fused"`` builds the drop-in modules of :mod:`deco_kernels.nn` (imported only
then), whose parameters have the same names and shapes, so one state_dict serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deco_kernels import reference

KERNELS = ("stock", "fused")


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(map(repr, KERNELS))}; got {kernels!r}")
    return kernels


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a B x C x H x W map (ConvNeXt's "channels_first" LayerNorm).

    Parameters ``weight``/``bias`` (C) as in ``nn.LayerNorm(C)``. Returns B x C x H x W.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class StockUpsampleAddConv(nn.Conv2d):
    """The CIM front in plain PyTorch: ``dwconv(u + memory) + u``, ``u`` = nearest upsampling of the query map.

    Parameters as ``nn.Conv2d(C, C, k, padding=k // 2, groups=C)`` (``weight`` C x 1 x k x k, ``bias`` C), the
    same as :class:`deco_kernels.nn.UpsampleAddConv`. forward(query B x C x h x w, memory B x C x H x W)
    -> B x C x H x W.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return reference.upsample_add_conv(query, memory, self.weight, self.bias)


def depthwise_conv(channels: int, kernel_size: int, kernels: str) -> nn.Module:
    """Depthwise 'same' convolution with bias: B x C x H x W -> B x C x H x W."""
    if check_kernels(kernels) == "fused":
        from deco_kernels.nn import DepthwiseConv2d

        return DepthwiseConv2d(channels, kernel_size, bias=True)
    return nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)


def conv_layer_norm(dwconv: nn.Module, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(dwconv(x).permute(0, 2, 3, 1))``: the front of encoder blocks and SIMs, B x C x H x W -> B x H x W x C.

    ``dwconv`` comes from :func:`depthwise_conv`: the stock ``nn.Conv2d`` runs the conv, permute and norm as
    three ops; the fused module runs them as one op that never writes the conv output, with the same
    parameters (``norm`` stays the caller's module, so state_dict keys do not change).
    """
    if isinstance(dwconv, nn.Conv2d):
        return norm(dwconv(x).permute(0, 2, 3, 1))
    return dwconv.forward_layer_norm(x, norm)


def upsample_add_conv(channels: int, kernel_size: int, kernels: str) -> nn.Module:
    """The CIM front (see :class:`StockUpsampleAddConv`); forward(query, memory)."""
    if check_kernels(kernels) == "fused":
        from deco_kernels.nn import UpsampleAddConv

        return UpsampleAddConv(channels, kernel_size, bias=True)
    return StockUpsampleAddConv(channels, kernel_size)


class StockScaleResidualMaxPool(nn.AdaptiveMaxPool2d):
    """The CIM back end in plain PyTorch: ``adaptive_max_pool2d((z + gamma * ffn).permute(0, 3, 1, 2))``.

    forward(z B x H x W x C, ffn B x H x W x C, gamma C) -> B x C x oh x ow; the same as
    :class:`deco_kernels.nn.ScaleResidualMaxPool2d`, which never writes the full-resolution sum.
    """

    def forward(self, z: torch.Tensor, ffn: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward((z + gamma * ffn).permute(0, 3, 1, 2))


def scale_residual_max_pool(output_size: tuple[int, int], kernels: str) -> nn.Module:
    """The CIM back end (see :class:`StockScaleResidualMaxPool`); forward(z, ffn, gamma)."""
    if check_kernels(kernels) == "fused":
        from deco_kernels.nn import ScaleResidualMaxPool2d

        return ScaleResidualMaxPool2d(output_size)
    return StockScaleResidualMaxPool(output_size)


class ConvFFN(nn.Module):
    """The ConvNeXt-style point-wise part shared by encoder blocks, SIM and CIM.

    ``x`` B x H x W x C (channels last) -> ``gamma * fc2(GELU(fc1(x)))``, same shape; hidden width
    ``ffn_ratio * C``; ``gamma`` is the per-channel layer scale (init 1e-6).
    """

    def __init__(self, channels: int, ffn_ratio: int, layer_scale_init: float = 1e-6):
        super().__init__()
        self.fc1 = nn.Linear(channels, ffn_ratio * channels)
        self.fc2 = nn.Linear(ffn_ratio * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale_init))

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """``fc2(GELU(fc1(x)))`` without the layer scale, for callers that fuse ``gamma`` into what follows."""
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.unscaled(x)
