"""DECO's encoder: ConvNeXt blocks on the projected last backbone stage, no positional encoding, stride 1."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deco.models.layers import ConvFFN, LayerNorm2d, conv_layer_norm, depthwise_conv


class EncoderBlock(nn.Module):
    """``x + ffn(LN(dwconv(x)))`` (ConvNeXt block; drop path 0). x: B x C x H x W -> B x C x H x W.

    dwconv: depthwise k x k with bias; LN over channels, eps 1e-6; ffn: C -> ffn_ratio*C -> C, GELU, layer scale.
    With ``kernels="fused"`` dwconv and LN are one op (:func:`~deco.models.layers.conv_layer_norm`).
    """

    def __init__(self, channels: int, kernel_size: int = 7, ffn_ratio: int = 4, kernels: str = "stock"):
        super().__init__()
        self.dwconv = depthwise_conv(channels, kernel_size, kernels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.ffn = ConvFFN(channels, ffn_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ffn(conv_layer_norm(self.dwconv, self.norm, x))
        return x + y.permute(0, 3, 1, 2)


class StageTransition(nn.Module):
    """Between encoder stages: channels-first LN (eps 1e-6), then a 1x1 conv to the next width (stride 1).

    x: B x C_in x H x W -> B x C_out x H x W.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = LayerNorm2d(in_channels, eps=1e-6)
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class Encoder(nn.Module):
    """Stages of ConvNeXt blocks (released: widths 120/240/480, depths 2/6/2) joined by :class:`StageTransition`.

    forward(x B x dims[0] x H x W) -> memory B x dims[-1] x H x W. ``norm`` (LN over dims[-1]) exists because
    the released model defines it, so parameter counts and checkpoints match, but it is not applied.
    """

    def __init__(
        self,
        dims: Sequence[int] = (120, 240, 480),
        depths: Sequence[int] = (2, 6, 2),
        kernel_size: int = 7,
        ffn_ratio: int = 4,
        kernels: str = "stock",
    ):
        super().__init__()
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"encoder_dims and encoder_depths must have the same non-zero length; got {dims}, {depths}")
        self.stages = nn.ModuleList(
            nn.Sequential(*(EncoderBlock(dim, kernel_size, ffn_ratio, kernels) for _ in range(depth)))
            for dim, depth in zip(dims, depths)
        )
        self.transitions = nn.ModuleList(StageTransition(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norm = LayerNorm2d(dims[-1], eps=1e-6)
        # Never applied, so it never gets a gradient: excluded from training (DistributedDataParallel rejects
        # trainable parameters without gradients) but still a parameter, so counts and checkpoints match.
        self.norm.requires_grad_(False)
        # ConvNeXt initialises every bias to zero (LayerNorm biases already are); the model re-initialises the
        # weights with xavier_uniform.
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, stage in enumerate(self.stages):
            if index > 0:
                x = self.transitions[index - 1](x)
            x = stage(x)
        return x


def build_encoder(
    dims: Sequence[int] = (120, 240, 480),
    depths: Sequence[int] = (2, 6, 2),
    ffn_ratio: int = 4,
    kernels: str = "stock",
) -> Encoder:
    return Encoder(dims, depths, kernel_size=7, ffn_ratio=ffn_ratio, kernels=kernels)
