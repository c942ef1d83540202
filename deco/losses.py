"""Set-prediction losses of DECO (sigmoid focal, as in Deformable DETR) and of DETR (softmax cross-entropy).

:class:`SetCriterion` matches every decoder layer's predictions to the targets separately (the final layer
and each auxiliary layer) and returns a dict of unweighted losses; ``criterion.weight_dict`` gives the weight
of each key, so the training objective is ``sum(losses[k] * weight_dict[k] for k in weight_dict)``
(:meth:`SetCriterion.total`). Keys: ``loss_ce``, ``loss_bbox``, ``loss_giou`` for the last layer and
``loss_ce_0``, ``loss_bbox_0``, ... for auxiliary layer 0, 1, ...
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from deco import distributed
from deco.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from deco.matcher import HungarianMatcher, concatenated_targets

__all__ = ["CLASS_LOSSES", "SetCriterion", "build_criterion", "sigmoid_focal_loss"]

CLASS_LOSSES = ("focal", "softmax_ce")


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Element-wise sigmoid focal loss (Lin et al. 2017); logits and 0/1 targets of the same shape."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


class SetCriterion(torch.nn.Module):
    """Hungarian-matched classification, L1 and GIoU losses over the final and every auxiliary layer.

    ``forward(outputs, targets)``: ``outputs`` as returned by the model — ``pred_logits`` B x Q x K,
    ``pred_boxes`` B x Q x 4 (cxcywh) and optionally ``aux_outputs``, a list of dicts of the same form;
    ``targets`` a list of B dicts with ``labels`` (N_i) and ``boxes`` (N_i x 4 cxcywh). K is
    ``num_classes`` for ``class_loss="focal"`` and ``num_classes + 1`` (no-object last) for ``"softmax_ce"``.

    Every loss is a sum over the batch divided by ``num_boxes``, the number of target boxes averaged over
    the distributed ranks and clamped at 1, so data-parallel training gives the gradient of the global batch.
    The focal loss is additionally multiplied by Q (Deformable DETR's ``loss.mean(1).sum() / num_boxes * Q``,
    i.e. the plain sum over queries and classes divided by num_boxes).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        class_loss: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        eos_coef: float = 0.1,
    ):
        super().__init__()
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"class_loss must be one of {CLASS_LOSSES}; got {class_loss!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.class_loss = class_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.eos_coef = eos_coef
        if class_loss == "softmax_ce":
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight)

    def _check_logits(self, logits: torch.Tensor) -> None:
        expected = self.num_classes + (1 if self.class_loss == "softmax_ce" else 0)
        if logits.shape[-1] != expected:
            raise ValueError(
                f"pred_logits must have {expected} classes for class_loss={self.class_loss!r} "
                f"(num_classes={self.num_classes}); got {logits.shape[-1]}"
            )

    def loss_labels(
        self, logits: torch.Tensor, pairs: MatchedPairs, target_labels: torch.Tensor, num_boxes: torch.Tensor
    ) -> torch.Tensor:
        # Unmatched queries are "no object": class num_classes (the extra softmax column, or, for the focal
        # loss, a column that is dropped so that those queries get an all-zero one-hot row).
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[pairs.batch, pairs.query] = target_labels[pairs.target]
        if self.class_loss == "softmax_ce":
            return F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight)
        one_hot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(torch.float32)
        loss = sigmoid_focal_loss(logits.float(), one_hot, self.focal_alpha, self.focal_gamma)
        return loss.sum() / num_boxes

    def loss_boxes(
        self, boxes: torch.Tensor, pairs: MatchedPairs, target_boxes: torch.Tensor, num_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pred_boxes = boxes[pairs.batch, pairs.query].float()
        matched_boxes = target_boxes[pairs.target]
        loss_bbox = F.l1_loss(pred_boxes, matched_boxes, reduction="sum") / num_boxes
        # The matcher has rejected inverted boxes already (without a host sync).
        giou = generalized_box_iou(
            box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(matched_boxes), check_inverted=False
        )
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return loss_bbox, loss_giou

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        layers = [outputs, *(outputs.get("aux_outputs") or ())]
        for layer in layers:
            self._check_logits(layer["pred_logits"])
        device = outputs["pred_logits"].device
        target_counts = [len(t["labels"]) for t in targets]
        num_boxes = distributed.mean_num_boxes(sum(target_counts), device)
        target_labels, target_boxes = concatenated_targets(targets, device)
        # Every layer is matched separately, but all in one go: a single host sync per step.
        layer_indices = self.matcher.match_layers(layers, targets, (target_labels, target_boxes))
        layer_pairs = _matched_pairs(layer_indices, target_counts, device)
        losses = {}
        for layer, (layer_outputs, pairs) in enumerate(zip(layers, layer_pairs)):
            loss_bbox, loss_giou = self.loss_boxes(layer_outputs["pred_boxes"], pairs, target_boxes, num_boxes)
            layer_losses = {
                "loss_ce": self.loss_labels(layer_outputs["pred_logits"], pairs, target_labels, num_boxes),
                "loss_bbox": loss_bbox,
                "loss_giou": loss_giou,
            }
            suffix = "" if layer == 0 else f"_{layer - 1}"
            losses.update({f"{name}{suffix}": value for name, value in layer_losses.items()})
        return losses

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted training objective."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


class MatchedPairs(NamedTuple):
    """The matched (prediction, target) pairs of one layer, M of them, as int64 index tensors on the device:
    prediction ``(batch[m], query[m])`` is matched to target ``target[m]`` of the batch's concatenated targets."""

    batch: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor


def _matched_pairs(
    layer_indices: list[list[tuple[torch.Tensor, torch.Tensor]]], target_counts: list[int], device: torch.device
) -> list[MatchedPairs]:
    """The matcher's per-image ``(query_index, target_index)`` pairs of each layer as :class:`MatchedPairs`, with
    the indices of all layers in one host-to-device copy (from pinned memory on a GPU, so the host goes on)."""
    offsets = [0, *itertools.accumulate(target_counts)]
    images, queries, matched = [], [], []
    for indices in layer_indices:
        for image, (query_index, target_index) in enumerate(indices):
            images.append(torch.full_like(query_index, image))
            queries.append(query_index)
            matched.append(target_index + offsets[image])
    pair_counts = [sum(len(query_index) for query_index, _ in indices) for indices in layer_indices]
    stacked = torch.stack([torch.cat(images), torch.cat(queries), torch.cat(matched)])
    if device.type == "cuda":
        stacked = stacked.pin_memory()
    stacked = stacked.to(device, non_blocking=True)
    return [MatchedPairs(*layer) for layer in stacked.split(pair_counts, dim=1)]


def build_criterion(
    num_classes: int,
    num_aux_layers: int,
    class_loss: str = "focal",
    class_weight: float | None = None,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    eos_coef: float = 0.1,
) -> SetCriterion:
    """The criterion and matcher of DECO (``class_loss="focal"``, class weight 2) or DETR (``"softmax_ce"``,
    class weight 1, no-object weight ``eos_coef``), with the loss weights repeated for each auxiliary layer.
    The matcher costs are the spec's (class 1, L1 5, GIoU 2) for both."""
    if class_weight is None:
        class_weight = 2.0 if class_loss == "focal" else 1.0
    matcher = HungarianMatcher(
        cost_class=1.0,
        cost_bbox=5.0,
        cost_giou=2.0,
        class_cost="focal" if class_loss == "focal" else "softmax",
    )
    weights = {"loss_ce": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
    weight_dict = dict(weights)
    for layer in range(num_aux_layers):
        weight_dict.update({f"{k}_{layer}": w for k, w in weights.items()})
    return SetCriterion(num_classes, matcher, weight_dict, class_loss=class_loss, eos_coef=eos_coef)
