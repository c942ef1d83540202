"""Prediction heads: one class head and one box MLP per decoder layer (no sharing, no box refinement)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Focal-loss prior: every class starts with probability 0.01, so the loss does not explode at step 0.
PRIOR_PROBABILITY = 0.01


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them: ... x in_dim -> ... x out_dim."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DetectionHeads(nn.Module):
    """Per layer: logits = Linear(d, num_classes), boxes = sigmoid(MLP d -> d -> d -> 4) in cxcywh.

    forward(per-layer features, each B x Q x d) -> {"pred_logits": B x Q x num_classes,
    "pred_boxes": B x Q x 4, "aux_outputs": [the same two for every layer but the last]}.
    """

    def __init__(self, d_model: int = 480, num_classes: int = 91, num_layers: int = 6):
        super().__init__()
        self.class_embed = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(num_layers))
        prior_bias = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
        for class_head, box_head in zip(self.class_embed, self.bbox_embed):
            nn.init.constant_(class_head.bias, prior_bias)
            last = box_head.layers[-1]
            nn.init.zeros_(last.weight)
            # Initial boxes: centred, sigmoid(-2) ~ 0.12 of the image wide and high.
            with torch.no_grad():
                last.bias.copy_(torch.tensor([0.0, 0.0, -2.0, -2.0]))

    def forward(self, features: Sequence[torch.Tensor]) -> dict:
        if len(features) != len(self.class_embed):
            raise ValueError(f"expected features of {len(self.class_embed)} decoder layers, got {len(features)}")
        # Every layer's heads in one batched matmul per head layer (L x d x B*Q): the same products as a Linear
        # per layer, with a sixth of the kernel launches, which bound a batch-2 training step.
        hidden = torch.stack(list(features))
        num_layers, batch, queries, _ = hidden.shape
        hidden = hidden.flatten(1, 2).transpose(1, 2)
        logits = _stacked_linear(hidden, self.class_embed)
        mlp_depth = len(self.bbox_embed[0].layers)
        for depth in range(mlp_depth):
            hidden = _stacked_linear(hidden, [mlp.layers[depth] for mlp in self.bbox_embed])
            if depth < mlp_depth - 1:
                hidden = F.relu(hidden)
        logits = logits.transpose(1, 2).unflatten(1, (batch, queries)).contiguous()
        boxes = hidden.sigmoid().transpose(1, 2).unflatten(1, (batch, queries)).contiguous()
        predictions = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits.unbind(), boxes.unbind())]
        return {**predictions[-1], "aux_outputs": predictions[:-1]}


def _stacked_linear(x: torch.Tensor, linears: Sequence[nn.Linear]) -> torch.Tensor:
    """``linears[l]`` applied to every column of ``x[l]``: x L x in x N -> L x out x N.

    Weight times input (not input times the transposed weight, as nn.Linear computes): each weight's gradient then
    comes out in the weight's own layout, where the transposed one would cost a copy per parameter.
    """
    weight = torch.stack([linear.weight for linear in linears])
    bias = torch.stack([linear.bias for linear in linears])
    return torch.baddbmm(bias.unsqueeze(2), weight, x)


def build_heads(d_model: int = 480, num_classes: int = 91, num_layers: int = 6) -> DetectionHeads:
    return DetectionHeads(d_model, num_classes, num_layers)
