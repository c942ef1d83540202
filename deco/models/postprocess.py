"""Turn DECO's outputs into scored, labelled boxes in image coordinates (no NMS: DECO is NMS-free)."""

from __future__ import annotations

import torch
from torch import nn

from deco.box_ops import box_cxcywh_to_xyxy


@torch.no_grad()
def postprocess(outputs: dict, target_sizes: torch.Tensor, top_k: int = 100) -> list[dict[str, torch.Tensor]]:
    """Top-``top_k`` (query, class) pairs per image by sigmoid score.

    outputs: {"pred_logits": B x Q x C, "pred_boxes": B x Q x 4 cxcywh in [0, 1], ...};
    target_sizes: B x 2 (height, width) of each original image. Returns B dicts: "scores" (top_k, float),
    "labels" (top_k, int64, = flat index % C), "boxes" (top_k x 4 xyxy in pixels of that image; the box of query
    flat index // C), sorted by decreasing score.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise ValueError(
            f"outputs must hold pred_logits B x Q x C and pred_boxes B x Q x 4; got {tuple(logits.shape)} and "
            f"{tuple(boxes.shape)}"
        )
    batch, num_queries, num_classes = logits.shape
    if target_sizes.shape != (batch, 2):
        raise ValueError(f"target_sizes must be B x 2 (height, width) with B = {batch}; got {tuple(target_sizes.shape)}")
    if not 1 <= top_k <= num_queries * num_classes:
        raise ValueError(f"top_k must be in 1..{num_queries * num_classes} (queries x classes); got {top_k}")
    scores, flat_index = logits.sigmoid().flatten(1).topk(top_k, dim=1)
    query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    selected = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query_index[..., None].expand(-1, -1, 4))
    height, width = target_sizes.to(selected.dtype).unbind(1)
    selected = selected * torch.stack((width, height, width, height), dim=1)[:, None, :]
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, selected)]


class PostProcess(nn.Module):
    """Module form of :func:`postprocess`: forward(outputs, target_sizes) -> list of B dicts."""

    def __init__(self, top_k: int = 100):
        super().__init__()
        self.top_k = top_k

    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return postprocess(outputs, target_sizes, self.top_k)
