"""Bounding-box conversions and overlap measures (pure functions on tensors, differentiable).

Formats: ``cxcywh`` = (centre x, centre y, width, height); ``xyxy`` = (x0, y0, x1, y1) with x0 <= x1 and
y0 <= y1 for a proper box. Every function takes ``... x 4`` tensors unless stated.
"""

from __future__ import annotations

import torch

__all__ = [
    "AREA_EPS",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "elementwise_generalized_box_iou",
    "generalized_box_iou",
]

# Lower bound on the union and enclosing-box areas. Two degenerate (zero-area) boxes have union 0 and, when
# they coincide, enclosing area 0; without the bound IoU and GIoU would be 0/0 = NaN, and the NaN would reach
# the matcher's cost matrix and the GIoU loss. With it such a pair gets IoU 0 and GIoU 0 (or -1 when the
# enclosing box has positive area), and the value for any box of real size is unchanged.
AREA_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``... x 4`` (cx, cy, w, h) -> ``... x 4`` (x0, y0, x1, y1)."""
    # On coordinate pairs: four kernels rather than nine (one per coordinate), the same values.
    centre, half_size = boxes[..., :2], 0.5 * boxes[..., 2:]
    return torch.cat((centre - half_size, centre + half_size), dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``... x 4`` (x0, y0, x1, y1) -> ``... x 4`` (cx, cy, w, h)."""
    low, high = boxes[..., :2], boxes[..., 2:]
    return torch.cat(((low + high) / 2, high - low), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``... x 4`` xyxy -> ``...`` areas (negative for an inverted box; not clamped)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _check_pair(boxes1: torch.Tensor, boxes2: torch.Tensor) -> None:
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"{name} must be an N x 4 tensor of xyxy boxes; got shape {tuple(boxes.shape)}")


def _check_not_inverted(boxes1: torch.Tensor, boxes2: torch.Tensor) -> None:
    # The check cannot run under graph capture or compilation (it reads a value on the host).
    if torch.compiler.is_compiling() or (boxes1.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if not bool((boxes[..., 2:] >= boxes[..., :2]).all()):
            raise ValueError(f"{name} holds an inverted box (x1 < x0 or y1 < y0); expected xyxy boxes")


def _iou_and_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union (clamped at AREA_EPS) of broadcastable ``... x 4`` xyxy boxes."""
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    overlap_wh = (bottom_right - top_left).clamp(min=0)
    intersection = overlap_wh[..., 0] * overlap_wh[..., 1]
    union = (box_area(boxes1) + box_area(boxes2) - intersection).clamp(min=AREA_EPS)
    return intersection / union, union


def _generalized_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of broadcastable ``... x 4`` xyxy boxes."""
    iou, union = _iou_and_union(boxes1, boxes2)
    top_left = torch.min(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    enclosing_wh = (bottom_right - top_left).clamp(min=0)
    enclosing = (enclosing_wh[..., 0] * enclosing_wh[..., 1]).clamp(min=AREA_EPS)
    return iou - (enclosing - union) / enclosing


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of xyxy boxes.

    boxes1: N x 4, boxes2: M x 4. Returns ``(iou, union)``, both N x M; ``union`` is clamped below at
    :data:`AREA_EPS` (see there), so degenerate boxes give IoU 0 instead of NaN.
    """
    _check_pair(boxes1, boxes2)
    return _iou_and_union(boxes1[:, None], boxes2[None])


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, *, check_inverted: bool = True) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes: ``iou - (enclosing - union) / enclosing``.

    boxes1: N x 4, boxes2: M x 4. Returns N x M in [-1, 1]. Union and enclosing area are clamped below at
    :data:`AREA_EPS`, so degenerate boxes never give NaN. Inverted boxes (x1 < x0) make the result meaningless
    and are rejected, unless ``check_inverted=False``: the check costs a host sync per call on a GPU, and the
    matcher and the loss validate their boxes in bulk instead.
    """
    _check_pair(boxes1, boxes2)
    if check_inverted:
        _check_not_inverted(boxes1, boxes2)
    return _generalized_iou(boxes1[:, None], boxes2[None])


def elementwise_generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, *, check_inverted: bool = True
) -> torch.Tensor:
    """The GIoU of each box in ``boxes1`` with the box at the same position in ``boxes2``.

    boxes1, boxes2: ``... x 4`` xyxy of one shape. Returns ``...``: the diagonal of :func:`generalized_box_iou`
    without the N x N matrix. Degenerate and inverted boxes as there.
    """
    if boxes1.shape != boxes2.shape or boxes1.dim() == 0 or boxes1.shape[-1] != 4:
        raise ValueError(
            "boxes1 and boxes2 must be ... x 4 xyxy boxes of one shape; got "
            f"{tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    if check_inverted:
        _check_not_inverted(boxes1, boxes2)
    return _generalized_iou(boxes1, boxes2)
