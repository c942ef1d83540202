"""DETR-R50 (Carion et al. 2020), the attention baseline DECO is measured against.

ResNet-50 with frozen BatchNorm (the same backbone as DECO's, :func:`deco.models.backbone.build_backbone`) ->
1x1 projection to 256 -> 6 post-norm encoder layers (self-attention with the sine positional encoding added to
queries and keys at every layer) -> 6 post-norm decoder layers over 100 learned queries (the decoder input is
zero, the learned embedding is the query position) -> a shared final LayerNorm on every layer's output ->
a class head (num_classes + 1 logits, "no object" last) and a 3-layer box MLP, both shared by all layers.
Hidden 256, 8 heads, FFN 2048 with ReLU, dropout 0.1. Trained with softmax cross-entropy, no-object weight 0.1
(:func:`deco.losses.build_criterion` with ``class_loss="softmax_ce"``).

The layers are built from ``torch.nn.MultiheadAttention`` / ``Linear`` / ``LayerNorm`` rather than
``nn.TransformerEncoderLayer``, because DETR adds the positional encodings to queries and keys inside every
layer, which the stock layer classes cannot express.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deco.models.backbone import build_backbone, check_images_and_mask
from deco.models.heads import MLP

__all__ = ["DETR", "build_detr", "sine_position_encoding"]


def sine_position_encoding(mask: torch.Tensor, num_features: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine encoding of the unpadded area.

    mask: B x H x W bool (True = padding) -> B x (2 * num_features) x H x W float32, y features first. Each
    coordinate is the running count of valid pixels along its axis, scaled to (0, 2 pi].
    """
    valid = (~mask).to(torch.float32)
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * (2 * math.pi)
    x = x / (x[:, :, -1:] + eps) * (2 * math.pi)
    index = torch.arange(num_features, dtype=torch.float32, device=mask.device)
    frequencies = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_features)
    pos_x = x[..., None] / frequencies
    pos_y = y[..., None] / frequencies
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class _FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, hidden)
        self.linear2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Post-norm self-attention + FFN; src, pos: B x S x d; padding_mask: B x S bool (True = padding)."""

    def __init__(self, d_model: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.ffn = _FeedForward(d_model, hidden, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        query = src + pos
        attended = self.self_attn(query, query, src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Post-norm self-attention over the queries, cross-attention to the memory, FFN.

    tgt, query_pos: B x Q x d; memory, pos: B x S x d; padding_mask: B x S bool.
    """

    def __init__(self, d_model: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.ffn = _FeedForward(d_model, hidden, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        query = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(query, query, tgt, need_weights=False)[0]))
        attended = self.cross_attn(
            tgt + query_pos, memory + pos, memory, key_padding_mask=padding_mask, need_weights=False
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class DETR(nn.Module):
    """forward(images B x 3 x H x W float, mask B x H x W bool or None (True = padding)) ->
    {"pred_logits": B x Q x (num_classes + 1), "pred_boxes": B x Q x 4 (cxcywh in [0, 1]),
    "aux_outputs": [the same two for decoder layers 1 .. 5]}."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_queries: int,
        d_model: int = 256,
        heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_hidden: int = 2048,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.num_channels, d_model, kernel_size=1)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d_model, heads, ffn_hidden, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d_model, heads, ffn_hidden, dropout) for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        # DETR initialises every matrix of its transformer with xavier_uniform.
        for module in (self.encoder_layers, self.decoder_layers):
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.num_queries = num_queries

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        mask = check_images_and_mask(images, mask)
        features, feature_mask = self.backbone(images, mask)
        src = self.input_proj(features)
        pos = sine_position_encoding(feature_mask, src.shape[1] // 2).to(src.dtype)
        memory = src.flatten(2).transpose(1, 2)  # B x HW x d
        pos = pos.flatten(2).transpose(1, 2)
        padding_mask = feature_mask.flatten(1)
        for layer in self.encoder_layers:
            memory = layer(memory, pos, padding_mask)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(images.shape[0], -1, -1).to(memory.dtype)
        tgt = torch.zeros_like(query_pos)
        per_layer = []
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, memory, pos, padding_mask)
            per_layer.append(self.decoder_norm(tgt))
        # The shared heads run once over all layers (L x B x Q x d), as in DETR's code.
        hidden = torch.stack(per_layer)
        logits, boxes = self.class_embed(hidden), self.bbox_embed(hidden).sigmoid()
        outputs = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits.unbind(), boxes.unbind())]
        return {**outputs[-1], "aux_outputs": outputs[:-1]}


def build_detr(num_classes: int = 91, num_queries: int = 100, backbone_weights: str | None = None) -> DETR:
    """DETR-R50 as published (41.3M parameters at 91 classes); ``backbone_weights`` is a local torchvision
    ResNet-50 state-dict file or None (random initialisation; nothing is downloaded)."""
    for name, value in (("num_classes", num_classes), ("num_queries", num_queries)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    return DETR(build_backbone("resnet50", "frozen", weights=backbone_weights), num_classes, num_queries)
