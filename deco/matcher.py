"""Hungarian matching of predicted queries to ground-truth boxes (DETR / Deformable DETR style).

The cost of giving query q to target t is
``cost_class * class_cost(q, t) + cost_bbox * L1(box_q, box_t) + cost_giou * (-GIoU(box_q, box_t))``
with boxes in normalised cxcywh. ``class_cost`` is either the sigmoid focal cost at the target class (DECO,
Deformable DETR) or ``-softmax(logits)[target class]`` (the original DETR). Each image is solved separately
with scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment

from deco.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["CLASS_COSTS", "HungarianMatcher", "concatenated_targets", "stacked_layers"]

CLASS_COSTS = ("focal", "softmax")


class HungarianMatcher(torch.nn.Module):
    """One-to-one assignment of queries to targets, per image.

    ``forward(outputs, targets)`` takes ``outputs["pred_logits"]`` (B x Q x K, K = num_classes for the focal
    cost, num_classes + 1 with the no-object column last for the softmax cost), ``outputs["pred_boxes"]``
    (B x Q x 4, cxcywh in [0, 1]) and ``targets``, a list of B dicts with ``"labels"`` (N_i int64) and
    ``"boxes"`` (N_i x 4 cxcywh). It returns a list of B pairs ``(query_index, target_index)``, int64 tensors
    of length min(Q, N_i) on the CPU, ``query_index`` in increasing order. :meth:`match_layers` matches the
    final and every auxiliary layer with one host sync in all (on a GPU each sync stalls the queue).
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        class_cost: str = "focal",
    ):
        super().__init__()
        if class_cost not in CLASS_COSTS:
            raise ValueError(f"class_cost must be one of {CLASS_COSTS}; got {class_cost!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class, cost_bbox and cost_giou are all 0: the assignment would be arbitrary")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.class_cost = class_cost

    def class_cost_matrix(self, logits: torch.Tensor, target_labels: torch.Tensor) -> torch.Tensor:
        """logits: M x K, target_labels: N int64 -> M x N class cost (lower is better)."""
        if self.class_cost == "softmax":
            return -logits.softmax(-1)[:, target_labels]
        prob = logits.sigmoid()[:, target_labels]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        positive = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
        negative = (1 - alpha) * prob**gamma * (-(1 - prob + 1e-8).log())
        return positive - negative

    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[torch.Tensor]:
        """The B per-image cost matrices of one layer, each Q x N_i float32 on the CPU."""
        return self.layer_cost_matrices([outputs], targets)[0]

    @torch.no_grad()
    def layer_cost_matrices(
        self,
        layers: Sequence[dict],
        targets: list[dict],
        concatenated: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[list[torch.Tensor]]:
        """The cost matrices of L layers' predictions (the final and the auxiliary decoder layers) against the
        same targets: L lists of B matrices, each Q x N_i float32 on the CPU. ``concatenated``: the targets'
        :func:`concatenated_targets` on the predictions' device, where the caller has made them already.

        Every layer must have the same B x Q x K logits shape (see :func:`stacked_layers`).
        """
        return self.stacked_cost_matrices(*stacked_layers(layers), targets, concatenated)

    @torch.no_grad()
    def stacked_cost_matrices(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: list[dict],
        concatenated: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[list[torch.Tensor]]:
        """:meth:`layer_cost_matrices` of :func:`stacked_layers`' logits (L x B x Q x K) and boxes (L x B x Q x 4).

        The costs of all layers come to the host in one copy, the only host sync. Inputs are validated without
        further syncs: a bad label, an inverted target or predicted box, or a non-finite prediction makes its cost
        NaN, and a non-finite cost is diagnosed after the copy.
        """
        num_layers, batch, num_queries, num_classes = logits.shape
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} predictions")
        sizes = [len(t["labels"]) for t in targets]
        # One cost matrix for all layers and images (every query against every target) keeps this to a few big
        # ops; each image then takes its own block of columns.
        flat_logits = logits.flatten(0, 2).float()
        flat_boxes = boxes.flatten(0, 2).float()
        target_labels, target_boxes = concatenated or concatenated_targets(targets, logits.device)
        valid_target = _labels_in_range(target_labels, num_classes) & _has_size(target_boxes)
        valid_prediction = _has_size(flat_boxes)
        cost = (
            self.cost_class * self.class_cost_matrix(flat_logits, target_labels.clamp(0, num_classes - 1))
            + self.cost_bbox * torch.cdist(flat_boxes, target_boxes, p=1)
            - self.cost_giou
            * generalized_box_iou(
                box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(target_boxes), check_inverted=False
            )
        )
        cost = cost.masked_fill(~(valid_prediction[:, None] & valid_target[None, :]), float("nan"))
        cost = cost.view(num_layers, batch, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():
            _diagnose_bad_cost(boxes, targets, num_classes)
        return [[block[image] for image, block in enumerate(layer.split(sizes, -1))] for layer in cost]

    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.match_layers([outputs], targets)[0]

    def match_layers(
        self,
        layers: Sequence[dict],
        targets: list[dict],
        concatenated: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`forward` for each of L layers (see :meth:`layer_cost_matrices`), with one host sync in all."""
        return self.match_stacked(*stacked_layers(layers), targets, concatenated)

    def match_stacked(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: list[dict],
        concatenated: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`match_layers` of :func:`stacked_layers`' logits and boxes (for a caller that stacks them anyway)."""
        return [
            [_assign(cost) for cost in layer_costs]
            for layer_costs in self.stacked_cost_matrices(logits, boxes, targets, concatenated)
        ]


def stacked_layers(layers: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``pred_logits`` (B x Q x K) and ``pred_boxes`` (B x Q x 4) of L layers, stacked: L x B x Q x K and
    L x B x Q x 4. Every layer must have the same shapes."""
    if not layers:
        raise ValueError("layers is empty: expected the predictions of at least one decoder layer")
    shape = None
    for outputs in layers:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
            raise ValueError(
                "outputs must hold pred_logits B x Q x K and pred_boxes B x Q x 4; got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        if shape is not None and logits.shape != shape:
            raise ValueError(
                f"every layer's pred_logits must have one shape; got {tuple(shape)} and {tuple(logits.shape)}"
            )
        shape = logits.shape
    logits = torch.stack([outputs["pred_logits"] for outputs in layers])
    boxes = torch.stack([outputs["pred_boxes"] for outputs in layers])
    return logits, boxes


def concatenated_targets(targets: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's target labels (N int64) and boxes (N x 4 float32) on ``device``, image after image."""
    labels = torch.cat([t["labels"] for t in targets]).to(device, torch.int64)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device, torch.float32)
    return labels, boxes


def _labels_in_range(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return (labels >= 0) & (labels < num_classes)


def _has_size(boxes: torch.Tensor) -> torch.Tensor:
    """Per ``... x 4`` cxcywh box: width and height both >= 0."""
    return (boxes[..., 2:] >= 0).all(-1)


def _assign(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    query_index, target_index = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(query_index, dtype=torch.int64), torch.as_tensor(target_index, dtype=torch.int64)


def _diagnose_bad_cost(boxes: torch.Tensor, targets: list[dict], num_classes: int) -> None:
    """Raise the error that explains a non-finite matching cost (off the fast path: host syncs are fine)."""
    for image, target in enumerate(targets):
        labels = target["labels"]
        if not _labels_in_range(labels, num_classes).all():
            raise ValueError(
                f"target labels must lie in [0, {num_classes}); targets[{image}]['labels'] = {labels.tolist()}"
            )
        if not _has_size(target["boxes"]).all():
            raise ValueError(f"targets[{image}]['boxes'] holds a box of negative width or height (expected cxcywh)")
    if not _has_size(boxes).all():
        raise ValueError("pred_boxes holds a box of negative width or height (expected cxcywh)")
    raise ValueError("the matching cost holds NaN or inf: the predictions are not finite")
