"""Drop-in modules over the ``deco_kernels`` ops.

``DepthwiseConv2d`` (with :meth:`DepthwiseConv2d.forward_layer_norm`, the conv and a LayerNorm over channels in
one op) and ``UpsampleAddConv`` hold exactly the parameters of
``nn.Conv2d(C, C, k, padding=k // 2, groups=C)`` (``weight`` C x 1 x kh x kw, ``bias`` C), initialised the
same way, so state_dicts move between them and stock convolutions unchanged. Each module takes
``backend=None`` (None: the process-wide setting at call time, see :mod:`deco_kernels.backend`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deco_kernels import ops
from deco_kernels.ops import _common

__all__ = ["AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "DepthwiseConv2d", "ScaleResidualMaxPool2d", "UpsampleAddConv"]


class _DepthwiseParameters(nn.Module):
    """``weight`` (C x 1 x kh x kw) and ``bias`` (C) of a depthwise 'same' convolution, as nn.Conv2d has them."""

    def __init__(
        self,
        channels: int,
        kernel_size: int | tuple[int, int],
        bias: bool = True,
        *,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{name}: channels must be a positive int; got {channels!r}")
        kh, kw = _common.pair(kernel_size, "kernel_size", name)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"{name}: kernel size must be odd; got {(kh, kw)}")
        if max(kh, kw) > _common.MAX_KERNEL_SIZE:
            raise ValueError(f"{name}: kernel size must be in 1..{_common.MAX_KERNEL_SIZE}; got {(kh, kw)}")
        self.channels = channels
        self.kernel_size = (kh, kw)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(channels, 1, kh, kw, **factory))
        self.bias = nn.Parameter(torch.empty(channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation: kaiming_uniform(a=sqrt(5)) weights, uniform(+-1/sqrt(fan_in)) bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.kernel_size[0] * self.kernel_size[1]  # one input channel per group
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, *, backend: str | None = None):
        """A module sharing ``conv``'s parameters; ``conv`` must be a depthwise 'same' stride-1 convolution."""
        channels = conv.in_channels
        kh, kw = conv.kernel_size
        if not (
            conv.groups == channels == conv.out_channels
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.padding == (kh // 2, kw // 2)
            and conv.padding_mode == "zeros"
        ):
            raise ValueError(
                f"{cls.__name__}.from_conv2d: conv must be depthwise (groups == in == out channels), stride 1, "
                f"dilation 1, zero padding (kh//2, kw//2); got {conv}"
            )
        module = cls(channels, (kh, kw), bias=conv.bias is not None, backend=backend,
                     device=conv.weight.device, dtype=conv.weight.dtype)
        module.weight = conv.weight
        if conv.bias is not None:
            module.bias = conv.bias
        return module

    def extra_repr(self) -> str:
        backend = "" if self.backend is None else f", backend={self.backend!r}"
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}{backend}"


class DepthwiseConv2d(_DepthwiseParameters):
    """Depthwise 'same' convolution, stride 1: forward(x B x C x H x W) -> B x C x H x W.

    :meth:`forward_layer_norm` applies a LayerNorm over channels to the output in the same op.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.depthwise_conv2d(x, self.weight, self.bias, backend=self.backend)

    def forward_layer_norm(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """``norm(self(x).permute(0, 2, 3, 1))`` as one op that never writes the conv output.

        x: B x C x H x W; norm: an ``nn.LayerNorm(C)`` with affine parameters (the caller owns it, so
        state_dicts keep its keys). Returns B x H x W x C contiguous, ready for Linear layers over channels.
        """
        if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (self.channels,):
            raise ValueError(f"{type(self).__name__}.forward_layer_norm: norm must be nn.LayerNorm({self.channels}); "
                             f"got {norm}")
        if norm.weight is None or norm.bias is None:
            raise ValueError(f"{type(self).__name__}.forward_layer_norm: norm must have a weight and a bias "
                             f"(elementwise_affine=True, bias=True); got {norm}")
        return ops.depthwise_conv2d_layernorm(
            x, self.weight, self.bias, norm.weight, norm.bias, norm.eps, backend=self.backend
        )


class UpsampleAddConv(_DepthwiseParameters):
    """DECO's CIM front: forward(query B x C x Hq x Wq, memory B x C x H x W) -> dwconv(u + memory) + u.

    u is the query upsampled (nearest) to memory's H x W; returns B x C x H x W.
    """

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return ops.upsample_add_conv(query, memory, self.weight, self.bias, backend=self.backend)


class _OutputSizeModule(nn.Module):
    """A parameter-free pooling module: the output grid ``(oh, ow)`` (None keeps that input dim) and a backend."""

    def __init__(self, output_size: int | tuple[int | None, int | None], *, backend: str | None = None) -> None:
        super().__init__()
        self.output_size = output_size
        self.backend = backend

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class AdaptiveMaxPool2d(_OutputSizeModule):
    """``nn.AdaptiveMaxPool2d(output_size)`` (no indices): B x C x H x W -> B x C x oh x ow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.adaptive_max_pool2d(x, self.output_size, backend=self.backend)


class AdaptiveAvgPool2d(_OutputSizeModule):
    """``nn.AdaptiveAvgPool2d(output_size)``: B x C x H x W -> B x C x oh x ow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.adaptive_avg_pool2d(x, self.output_size, backend=self.backend)


class ScaleResidualMaxPool2d(_OutputSizeModule):
    """DECO's CIM back end: forward(z, ffn, gamma) -> ``adaptive_max_pool2d((z + gamma * ffn).permute(0, 3, 1, 2))``.

    z, ffn: B x H x W x C (channels innermost, as the CIM's Linear layers leave them); gamma: C (the layer scale,
    owned by the caller). Returns B x C x oh x ow (channels-last memory format) without writing the sum.
    """

    def forward(self, z: torch.Tensor, ffn: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return ops.scale_residual_max_pool(z, ffn, gamma, self.output_size, backend=self.backend)
