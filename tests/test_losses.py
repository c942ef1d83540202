"""SetCriterion on hand-made cases: focal and softmax cross-entropy, perfect predictions, degenerate boxes."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from deco.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from deco.losses import build_criterion, sigmoid_focal_loss


def test_sigmoid_focal_loss_matches_formula():
    logits = torch.tensor([[-2.0, 0.5], [3.0, -0.1]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = logits.sigmoid()
    expected = torch.where(
        targets == 1, -0.25 * (1 - p) ** 2 * torch.log(p), -0.75 * p**2 * torch.log(1 - p)
    )
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), expected)


def test_perfect_boxes_give_zero_box_losses_and_focal_normalisation():
    """One image, two targets, three queries: queries 0 and 2 predict the targets exactly."""
    target_boxes = torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]])
    pred_boxes = torch.tensor([[[0.7, 0.6, 0.3, 0.1], [0.5, 0.5, 0.9, 0.9], [0.3, 0.4, 0.2, 0.2]]])
    logits = torch.full((1, 3, 3), -4.0)
    logits[0, 0, 2] = 4.0
    logits[0, 2, 1] = 4.0
    targets = [{"labels": torch.tensor([1, 2]), "boxes": target_boxes}]
    criterion = build_criterion(num_classes=3, num_aux_layers=0)
    losses = criterion({"pred_logits": logits, "pred_boxes": pred_boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.zeros(1, 3, 3)
    one_hot[0, 0, 2] = 1
    one_hot[0, 2, 1] = 1
    # Deformable DETR's normalisation: mean over queries, sum, / num_boxes, * num_queries.
    expected_ce = sigmoid_focal_loss(logits, one_hot).mean(1).sum() / 2 * 3
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert criterion.weight_dict == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def test_box_losses_on_a_hand_computed_case():
    # Prediction and target side by side, same size: L1 = |0.2| (cx only); IoU 0; enclosing/union = 1 -> GIoU 0.
    pred = torch.tensor([[[0.3, 0.5, 0.2, 0.2]]])
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    losses = build_criterion(1, 0)({"pred_logits": torch.zeros(1, 1, 1), "pred_boxes": pred}, [target])
    assert losses["loss_bbox"].item() == pytest.approx(0.2, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(1.0, abs=1e-6)
    # focal at p = 0.5 for the one positive: 0.25 * 0.25 * log 2, num_boxes = 1, Q = 1.
    assert losses["loss_ce"].item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)


def test_softmax_cross_entropy_with_no_object_weight():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3 + 1, generator=generator)
    boxes = torch.rand(2, 4, 2, generator=generator) * 0.5 + 0.25
    boxes = torch.cat([boxes, torch.full_like(boxes, 0.2)], -1)
    targets = [
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    criterion = build_criterion(num_classes=3, num_aux_layers=0, class_loss="softmax_ce")
    assert criterion.weight_dict["loss_ce"] == 1.0
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    ((query, _), _) = criterion.matcher(outputs, targets)
    losses = criterion(outputs, targets)
    classes = torch.full((2, 4), 3)
    classes[0, query] = 2
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    per_query = F.cross_entropy(logits.reshape(-1, 4), classes.reshape(-1), reduction="none")
    expected = (per_query * weight[classes.reshape(-1)]).sum() / weight[classes.reshape(-1)].sum()
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="4 classes"):
        criterion({"pred_logits": logits[..., :3], "pred_boxes": boxes}, targets)


def test_aux_layers_are_matched_separately_and_weighted():
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    # Final layer: query 1 is right; auxiliary layer: query 0 is right. Separate matching gives 0 box loss in both.
    final = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])
    aux = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]])
    logits = torch.zeros(1, 2, 1)
    criterion = build_criterion(1, num_aux_layers=1)
    outputs = {"pred_logits": logits, "pred_boxes": final, "aux_outputs": [{"pred_logits": logits, "pred_boxes": aux}]}
    losses = criterion(outputs, [target])
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_bbox_0"].item() == pytest.approx(0, abs=1e-6)
    assert set(criterion.weight_dict) == set(losses)
    total = criterion.total(losses)
    assert total.item() == pytest.approx(sum(losses[k].item() * w for k, w in criterion.weight_dict.items()), rel=1e-6)
    # A weight changed after a call counts in the next one; a loss without a weight counts for nothing.
    criterion.weight_dict["loss_ce_0"] = 100.0
    changed = criterion.total({**losses, "loss_unweighted": torch.tensor(1e6)})
    assert changed.item() == pytest.approx(total.item() + 98 * losses["loss_ce_0"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="none of the weighted losses"):
        criterion.total({"loss_unweighted": torch.tensor(1.0)})


def test_layers_and_images_get_their_own_matches():
    """Several images (one without targets) and auxiliary layers: every layer's losses equal that layer's losses
    computed alone, and the final layer's box losses equal a per-image sum over the matched pairs."""
    generator = torch.Generator().manual_seed(5)
    batch, num_queries, num_classes = 3, 6, 4

    def layer():
        logits = torch.randn(batch, num_queries, num_classes, generator=generator)
        centre = torch.rand(batch, num_queries, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(batch, num_queries, 2, generator=generator) * 0.3 + 0.05
        return {"pred_logits": logits, "pred_boxes": torch.cat([centre, size], -1)}

    targets = []
    for count in (3, 0, 5):
        centre = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        targets.append({"labels": torch.randint(num_classes, (count,), generator=generator),
                        "boxes": torch.cat([centre, size], -1)})
    final, aux = layer(), [layer(), layer()]
    criterion = build_criterion(num_classes, num_aux_layers=2)
    losses = criterion({**final, "aux_outputs": aux}, targets)
    for index, outputs in enumerate([final, *aux]):
        alone = criterion(outputs, targets)
        suffix = "" if index == 0 else f"_{index - 1}"
        for name, value in alone.items():
            torch.testing.assert_close(losses[name + suffix], value, rtol=0, atol=0)

    l1, giou_loss = 0.0, 0.0
    for image, (queries, matched) in enumerate(criterion.matcher(final, targets)):
        for query, target in zip(queries.tolist(), matched.tolist()):
            predicted, expected = final["pred_boxes"][image, query].double(), targets[image]["boxes"][target].double()
            l1 += (predicted - expected).abs().sum().item()
            giou = generalized_box_iou(box_cxcywh_to_xyxy(predicted[None]), box_cxcywh_to_xyxy(expected[None]))
            giou_loss += 1 - giou.item()
    assert losses["loss_bbox"].item() == pytest.approx(l1 / 8, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(giou_loss / 8, rel=1e-5)


def _layer_losses_float64(criterion, outputs, targets, num_boxes):
    """One layer's losses the plain way (DETR's code shape), in float64: a per-layer reference."""
    logits, boxes = outputs["pred_logits"].double(), outputs["pred_boxes"].double()
    indices = criterion.matcher({k: v.detach().float() for k, v in outputs.items()}, targets)
    classes = torch.full(logits.shape[:2], criterion.num_classes, dtype=torch.int64)
    predicted, matched = [], []
    for image, (queries, target_index) in enumerate(indices):
        classes[image, queries] = targets[image]["labels"][target_index]
        predicted.append(boxes[image, queries])
        matched.append(targets[image]["boxes"][target_index].double())
    predicted, matched = torch.cat(predicted), torch.cat(matched)
    if criterion.class_loss == "softmax_ce":
        loss_ce = F.cross_entropy(logits.transpose(1, 2), classes, criterion.empty_weight.double())
    else:
        one_hot = F.one_hot(classes, criterion.num_classes + 1)[..., :-1].double()
        loss_ce = sigmoid_focal_loss(logits, one_hot).sum() / num_boxes
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(matched)))
    return {
        "loss_ce": loss_ce,
        "loss_bbox": (predicted - matched).abs().sum() / num_boxes,
        "loss_giou": (1 - giou).sum() / num_boxes,
    }


@pytest.mark.parametrize("class_loss", ["focal", "softmax_ce"])
@pytest.mark.parametrize(
    "counts", [(3, 0, 5), (0, 0), (9, 2)], ids=["mixed", "no-targets", "more-targets-than-queries"]
)
def test_all_layers_at_once_match_a_float64_per_layer_reference(class_loss, counts):
    """The losses of every layer, computed together, and their gradients for every layer's logits and boxes equal
    each layer's losses computed on its own in float64."""
    generator = torch.Generator().manual_seed(len(counts) * 10 + counts[0])
    num_queries, num_classes, num_layers = 6, 4, 4
    width = num_classes + (1 if class_loss == "softmax_ce" else 0)
    layers = []
    for _ in range(num_layers):
        centre = torch.rand(len(counts), num_queries, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(len(counts), num_queries, 2, generator=generator) * 0.3 + 0.05
        layers.append({
            "pred_logits": torch.randn(len(counts), num_queries, width, generator=generator).requires_grad_(),
            "pred_boxes": torch.cat([centre, size], -1).requires_grad_(),
        })
    targets = []
    for count in counts:
        centre = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        targets.append({"labels": torch.randint(num_classes, (count,), generator=generator),
                        "boxes": torch.cat([centre, size], -1)})
    criterion = build_criterion(num_classes, num_aux_layers=num_layers - 1, class_loss=class_loss)
    losses = criterion({**layers[0], "aux_outputs": layers[1:]}, targets)
    criterion.total(losses).backward()

    num_boxes = max(sum(counts), 1)
    reference = {}
    leaves = [{k: v.detach().double().requires_grad_() for k, v in layer.items()} for layer in layers]
    for index, layer in enumerate(leaves):
        suffix = "" if index == 0 else f"_{index - 1}"
        for name, value in _layer_losses_float64(criterion, layer, targets, num_boxes).items():
            reference[name + suffix] = value
    criterion.total(reference).backward()

    assert set(losses) == set(reference)
    for name, value in losses.items():
        torch.testing.assert_close(value, reference[name].float(), msg=name)
    for layer, expected in zip(layers, leaves):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(layer[key].grad, expected[key].grad.float(), msg=key)


def test_the_number_of_ops_hardly_grows_with_the_decoder_layers():
    """All layers' losses are computed in one set of ops (a training step's host time goes into launching them):
    the ops of matching, losses, weighted total and backward for six layers stay under twice those of one layer
    (a loop over layers made it about five times)."""

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    def ops_for(num_layers):
        generator = torch.Generator().manual_seed(0)
        layers = [
            {"pred_logits": torch.randn(2, 100, 91, generator=generator).requires_grad_(),
             "pred_boxes": (torch.rand(2, 100, 4, generator=generator) * 0.3 + 0.2).requires_grad_()}
            for _ in range(num_layers)
        ]
        targets = [{"labels": torch.randint(91, (n,), generator=generator),
                    "boxes": torch.rand(n, 4, generator=generator) * 0.3 + 0.2} for n in (7, 13)]
        criterion = build_criterion(91, num_aux_layers=num_layers - 1)
        with CountOps() as counter:
            criterion.total(criterion({**layers[0], "aux_outputs": layers[1:]}, targets)).backward()
        return counter.count

    one, six = ops_for(1), ops_for(6)
    assert six < 2 * one, (one, six)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with a CUDA device")
def test_criterion_syncs_the_host_once_on_cuda():
    """Matching and losses of every layer wait for the GPU once: the copy of the cost matrices to the host."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(2)
    batch, num_queries, num_classes = 4, 20, 91
    layers = [
        {"pred_logits": torch.randn(batch, num_queries, num_classes, generator=generator).to(device),
         "pred_boxes": (torch.rand(batch, num_queries, 4, generator=generator) * 0.4 + 0.1).to(device)}
        for _ in range(6)
    ]
    targets = [{"labels": torch.randint(num_classes, (n,), generator=generator).to(device),
                "boxes": (torch.rand(n, 4, generator=generator) * 0.4 + 0.1).to(device)} for n in (5, 0, 12, 1)]
    criterion = build_criterion(num_classes, num_aux_layers=5).to(device)
    outputs = {**layers[0], "aux_outputs": layers[1:]}
    criterion(outputs, targets)  # warm-up: lazy initialisation may sync (total's first call must not)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            criterion.total(criterion(outputs, targets))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [f"{w.filename}:{w.lineno}" for w in syncs]


def test_empty_targets_give_finite_loss_with_num_boxes_clamped():
    logits = torch.randn(2, 3, 2, requires_grad=True)
    boxes = torch.full((2, 3, 4), 0.3, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = build_criterion(2, 0)({"pred_logits": logits, "pred_boxes": boxes}, [empty, empty])
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    expected_ce = sigmoid_focal_loss(logits, torch.zeros_like(logits)).sum()  # num_boxes clamped at 1
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all()


def test_degenerate_boxes_give_finite_losses_and_gradients():
    # Zero-width / zero-height predictions and targets, coincident degenerate boxes, a point box.
    pred = torch.tensor(
        [[[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.0, 0.3], [0.7, 0.7, 0.4, 0.0], [0.5, 0.5, 1e-9, 1e-9]]],
        requires_grad=True,
    )
    logits = torch.randn(1, 4, 2, requires_grad=True)
    target = {"labels": torch.tensor([0, 1, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.0, 0.3], [0.1, 0.9, 0.2, 0.0]])}
    criterion = build_criterion(2, 0)
    losses = criterion({"pred_logits": logits, "pred_boxes": pred}, [target])
    for name, value in losses.items():
        assert torch.isfinite(value), name
    criterion.total(losses).backward()
    assert torch.isfinite(pred.grad).all() and torch.isfinite(logits.grad).all()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="class_loss"):
        build_criterion(2, 0, class_loss="hinge")
    with pytest.raises(ValueError, match="2 classes"):
        build_criterion(2, 0)({"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.full((1, 2, 4), 0.5)},
                              [{"labels": torch.tensor([0]), "boxes": torch.full((1, 4), 0.5)}])
