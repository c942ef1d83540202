"""Hungarian matching of predicted queries to ground-truth boxes (DETR / Deformable DETR style).

The cost of giving query q to target t is
``cost_class * class_cost(q, t) + cost_bbox * L1(box_q, box_t) + cost_giou * (-GIoU(box_q, box_t))``
with boxes in normalised cxcywh. ``class_cost`` is either the sigmoid focal cost at the target class (DECO,
Deformable DETR) or ``-softmax(logits)[target class]`` (the original DETR). Each image is solved separately
with scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from deco.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["CLASS_COSTS", "HungarianMatcher"]

CLASS_COSTS = ("focal", "softmax")


class HungarianMatcher(torch.nn.Module):
    """One-to-one assignment of queries to targets, per image.

    ``forward(outputs, targets)`` takes ``outputs["pred_logits"]`` (B x Q x K, K = num_classes for the focal
    cost, num_classes + 1 with the no-object column last for the softmax cost), ``outputs["pred_boxes"]``
    (B x Q x 4, cxcywh in [0, 1]) and ``targets``, a list of B dicts with ``"labels"`` (N_i int64) and
    ``"boxes"`` (N_i x 4 cxcywh). It returns a list of B pairs ``(query_index, target_index)``, int64 tensors
    of length min(Q, N_i) on the CPU, ``query_index`` in increasing order.
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

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[torch.Tensor]:
        """The B per-image cost matrices, each Q x N_i float32 on the CPU."""
        logits = outputs["pred_logits"]
        boxes = outputs["pred_boxes"]
        if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
            raise ValueError(
                "outputs must hold pred_logits B x Q x K and pred_boxes B x Q x 4; got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {logits.shape[0]} predictions")
        batch, num_queries = logits.shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        # One cost matrix for the whole batch (all queries against all targets) keeps this to a few big ops;
        # each image then takes its own block of columns.
        flat_logits = logits.flatten(0, 1).float()
        flat_boxes = boxes.flatten(0, 1).float()
        target_labels = torch.cat([t["labels"] for t in targets]).to(logits.device, torch.int64)
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device, torch.float32)
        if target_labels.numel() and (target_labels.min() < 0 or target_labels.max() >= logits.shape[-1]):
            raise ValueError(f"target labels must lie in [0, {logits.shape[-1]}); got {target_labels.tolist()}")
        cost = (
            self.cost_class * self.class_cost_matrix(flat_logits, target_labels)
            + self.cost_bbox * torch.cdist(flat_boxes, target_boxes, p=1)
            - self.cost_giou
            * generalized_box_iou(box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(target_boxes))
        )
        cost = cost.view(batch, num_queries, -1).cpu()
        return [block[image] for image, block in enumerate(cost.split(sizes, -1))]

    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = []
        for cost in self.cost_matrices(outputs, targets):
            if not torch.isfinite(cost).all():
                raise ValueError("the matching cost holds NaN or inf: the predictions are not finite")
            query_index, target_index = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(query_index, dtype=torch.int64), torch.as_tensor(target_index, dtype=torch.int64))
            )
        return indices
