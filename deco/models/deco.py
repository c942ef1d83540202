"""The DECO detector and its factory :func:`build_deco`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from deco.models.backbone import BACKBONES, build_backbone, check_images_and_mask
from deco.models.decoder import build_decoder
from deco.models.encoder import build_encoder
from deco.models.heads import build_heads
from deco.models.layers import check_kernels


class DECO(nn.Module):
    """Backbone -> 1x1 input projection -> ConvNeXt encoder -> SIM/CIM decoder -> per-layer heads.

    forward(images B x 3 x H x W float, mask B x H x W bool or None (True = padding)) ->
    {"pred_logits": B x Q x num_classes, "pred_boxes": B x Q x 4 (cxcywh in [0, 1]),
    "aux_outputs": [the same two for decoder layers 1 .. L-1]}.
    The forward has no host synchronisation and no data-dependent shapes. ``config`` holds the keyword
    arguments of :func:`build_deco` that rebuild this architecture.
    """

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module, heads: nn.Module, config: dict):
        super().__init__()
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.num_channels, config["encoder_dims"][0], kernel_size=1)
        self.encoder = encoder
        self.decoder = decoder
        self.heads = heads
        self.config = dict(config)
        # The release initialises every matrix/kernel of its encoder+decoder module (which holds `tgt` but not
        # the positional queries) with xavier_uniform; the positional queries keep nn.Embedding's N(0, 1).
        for parameter in itertools.chain(encoder.parameters(), decoder.parameters()):
            if parameter.dim() > 1 and parameter is not decoder.query_pos.weight:
                nn.init.xavier_uniform_(parameter)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        mask = check_images_and_mask(images, mask)
        # The resized mask is returned by the backbone but, as in the release, used by nothing downstream.
        features, _ = self.backbone(images, mask)
        memory = self.encoder(self.input_proj(features))
        return self.heads(self.decoder(memory))


def build_deco(
    backbone: str = "resnet50",
    num_classes: int = 91,
    num_queries: int = 100,
    query_grid: Sequence[int] = (10, 10),
    backbone_weights: str | None = None,
    kernels: str = "stock",
    *,
    d_model: int = 480,
    encoder_dims: Sequence[int] = (120, 240, 480),
    encoder_depths: Sequence[int] = (2, 6, 2),
    num_decoder_layers: int = 6,
    ffn_ratio: int = 4,
    backbone_norm: str = "frozen",
    freeze_backbone_stages: int | None = None,
) -> DECO:
    """Build DECO; the defaults are the released DECO-R50 (COCO, 91 class slots, 100 queries on a 10x10 grid).

    backbone: "resnet18" | "resnet50" | "convnext_tiny". backbone_weights: a local torchvision/timm state-dict
    file for the backbone, or for ConvNeXt-T one in facebookresearch/ConvNeXt's layout (loaded strictly; nothing
    is downloaded). kernels: "stock" (plain PyTorch) or "fused" (:mod:`deco_kernels.nn` for the depthwise convs,
    the CIM upsample-add-conv and the CIM max pool; same state_dict). The keyword-only arguments shrink the model
    (tests, demos) or change training set-up: backbone_norm "frozen" (release) or "batch" (trainable BatchNorm,
    for training from scratch); freeze_backbone_stages: None = release (ResNet: stem + layer1 frozen; ConvNeXt:
    nothing), 0 = nothing, n = the stem and the first n stages.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(map(repr, BACKBONES))}; got {backbone!r}")
    check_kernels(kernels)
    for name, value in (
        ("num_classes", num_classes),
        ("num_queries", num_queries),
        ("d_model", d_model),
        ("num_decoder_layers", num_decoder_layers),
        ("ffn_ratio", ffn_ratio),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    query_grid = tuple(query_grid)
    if len(query_grid) != 2 or any(not isinstance(n, int) or n < 1 for n in query_grid):
        raise ValueError(f"query_grid must be two positive ints (rows, columns); got {query_grid!r}")
    if query_grid[0] * query_grid[1] != num_queries:
        raise ValueError(
            f"query_grid {query_grid} holds {query_grid[0] * query_grid[1]} queries but num_queries is {num_queries}"
        )
    encoder_dims, encoder_depths = tuple(encoder_dims), tuple(encoder_depths)
    if not encoder_dims or any(not isinstance(n, int) or n < 1 for n in encoder_dims):
        raise ValueError(f"encoder_dims must be positive ints; got {encoder_dims!r}")
    if len(encoder_depths) != len(encoder_dims) or any(not isinstance(n, int) or n < 0 for n in encoder_depths):
        raise ValueError(
            f"encoder_depths must hold one non-negative int per encoder stage ({len(encoder_dims)}); "
            f"got {encoder_depths!r}"
        )
    if encoder_dims[-1] != d_model:
        raise ValueError(f"encoder_dims[-1] ({encoder_dims[-1]}) must equal d_model ({d_model})")
    config = {
        "backbone": backbone,
        "num_classes": num_classes,
        "num_queries": num_queries,
        "query_grid": query_grid,
        "kernels": kernels,
        "d_model": d_model,
        "encoder_dims": encoder_dims,
        "encoder_depths": encoder_depths,
        "num_decoder_layers": num_decoder_layers,
        "ffn_ratio": ffn_ratio,
        "backbone_norm": backbone_norm,
        "freeze_backbone_stages": freeze_backbone_stages,
    }
    return DECO(
        backbone=build_backbone(backbone, backbone_norm, freeze_backbone_stages, backbone_weights),
        encoder=build_encoder(encoder_dims, encoder_depths, ffn_ratio, kernels),
        decoder=build_decoder(d_model, num_queries, query_grid, num_decoder_layers, ffn_ratio, kernels),
        heads=build_heads(d_model, num_classes, num_decoder_layers),
        config=config,
    )
