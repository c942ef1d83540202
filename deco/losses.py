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

import numpy as np
import torch
import torch.nn.functional as F

from deco import distributed
from deco.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from deco.matcher import HungarianMatcher, concatenated_targets, stacked_layers

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
        self._weight_tensors: dict[tuple, torch.Tensor] = {}  # total()'s weights, per (weights, device, dtype)
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
        """logits: L x B x Q x K (L decoder layers) -> the L layers' classification losses."""
        # Unmatched queries are "no object": class num_classes (the extra softmax column, or, for the focal
        # loss, a column that is dropped so that those queries get an all-zero one-hot row).
        num_layers = logits.shape[0]
        target_classes = torch.full(logits.shape[:3], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[pairs.layer, pairs.batch, pairs.query] = target_labels[pairs.target]
        if self.class_loss == "softmax_ce":
            # F.cross_entropy's weighted mean, per layer: sum of weight * CE over the sum of the weights.
            ce = F.cross_entropy(
                logits.flatten(0, 1).transpose(1, 2).float(), target_classes.flatten(0, 1), self.empty_weight,
                reduction="none",
            )
            return ce.view(num_layers, -1).sum(1) / self.empty_weight[target_classes].view(num_layers, -1).sum(1)
        one_hot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(torch.float32)
        loss = sigmoid_focal_loss(logits.float(), one_hot, self.focal_alpha, self.focal_gamma)
        return loss.view(num_layers, -1).sum(1) / num_boxes

    def loss_boxes(
        self, boxes: torch.Tensor, pairs: MatchedPairs, target_boxes: torch.Tensor, num_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """boxes: L x B x Q x 4 -> the L layers' L1 and GIoU losses."""
        pred_boxes = boxes[pairs.layer, pairs.batch, pairs.query].float()  # L x M x 4
        matched_boxes = target_boxes[pairs.target]
        loss_bbox = (pred_boxes - matched_boxes).abs().sum((1, 2)) / num_boxes
        # The matcher has rejected inverted boxes already (without a host sync).
        giou = elementwise_generalized_box_iou(
            box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(matched_boxes), check_inverted=False
        )
        loss_giou = (1 - giou).sum(1) / num_boxes
        return loss_bbox, loss_giou

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        # The losses of all layers in one set of ops on the stacked layers (L x B x Q x ...), which the matcher
        # reads too: a step's host time is mostly spent launching kernels, and one layer's losses are as many
        # launches as all six.
        logits, boxes = stacked_layers([outputs, *(outputs.get("aux_outputs") or ())])
        self._check_logits(logits)
        device = logits.device
        target_counts = [len(t["labels"]) for t in targets]
        num_boxes = distributed.mean_num_boxes(sum(target_counts), device)
        target_labels, target_boxes = concatenated_targets(targets, device)
        # Every layer is matched separately, but all in one go: a single host sync per step.
        layer_indices = self.matcher.match_stacked(logits, boxes, targets, (target_labels, target_boxes))
        pairs = _matched_pairs(layer_indices, target_counts, device)
        loss_bbox, loss_giou = self.loss_boxes(boxes, pairs, target_boxes, num_boxes)
        per_layer = {
            "loss_ce": self.loss_labels(logits, pairs, target_labels, num_boxes),
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
        }
        losses = {}
        for name, values in per_layer.items():
            for layer, value in enumerate(values.unbind()):
                losses[name if layer == 0 else f"{name}_{layer - 1}"] = value
        return losses

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted training objective: the sum of ``losses[k] * weight_dict[k]`` over the keys of both."""
        keys = [k for k in self.weight_dict if k in losses]
        if not keys:
            raise ValueError(
                f"losses holds none of the weighted losses {sorted(self.weight_dict)}; got {sorted(losses)}"
            )
        # Three ops whatever the number of layers, rather than a multiply and an add per loss term.
        values = torch.stack([losses[k] for k in keys])
        weights = tuple(self.weight_dict[k] for k in keys)
        cache_key = (weights, values.device, values.dtype)
        weight_tensor = self._weight_tensors.get(cache_key)
        if weight_tensor is None:
            weight_tensor = _to_device_without_waiting(torch.tensor(weights, dtype=values.dtype), values.device)
            self._weight_tensors[cache_key] = weight_tensor
        return (values * weight_tensor).sum()


class MatchedPairs(NamedTuple):
    """The matched (prediction, target) pairs of L layers as int64 L x M index tensors on the device (every
    layer matches the same number M: min(Q, N_i) per image): prediction ``(layer[l, m], batch[l, m],
    query[l, m])`` is matched to target ``target[l, m]`` of the batch's concatenated targets."""

    layer: torch.Tensor
    batch: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor


def _matched_pairs(
    layer_indices: list[list[tuple[torch.Tensor, torch.Tensor]]], target_counts: list[int], device: torch.device
) -> MatchedPairs:
    """The matcher's per-image ``(query_index, target_index)`` pairs of each layer as :class:`MatchedPairs`, with
    the indices of all layers in one host-to-device copy (from pinned memory on a GPU, so the host goes on)."""
    offsets = [0, *itertools.accumulate(target_counts)]
    # Assembled in numpy: a few dozen small CPU tensor ops would cost more host time than the copy.
    columns = [np.zeros((4, 0), dtype=np.int64)]
    for layer, indices in enumerate(layer_indices):
        for image, (query_index, target_index) in enumerate(indices):
            count = len(query_index)
            columns.append(np.stack([
                np.full(count, layer), np.full(count, image), query_index.numpy(), target_index.numpy() + offsets[image]
            ]))
    stacked = torch.from_numpy(np.concatenate(columns, axis=1))
    return MatchedPairs(*_to_device_without_waiting(stacked, device).view(4, len(layer_indices), -1))


def _to_device_without_waiting(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU ``tensor`` on ``device``; to a GPU from pinned memory without blocking, as a plain copy from pageable
    memory makes the host wait for the device's queue."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


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
