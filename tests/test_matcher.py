"""HungarianMatcher against brute force over every assignment, for both class costs."""

import itertools

import pytest
import torch

from deco.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from deco.matcher import HungarianMatcher


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], -1)


def brute_force_cost(logits, boxes, labels, target_boxes, class_cost, alpha=0.25, gamma=2.0):
    """The cost matrix written out entry by entry in float64, independently of the matcher's batched code."""
    num_queries, num_targets = logits.shape[0], labels.shape[0]
    cost = torch.zeros(num_queries, num_targets, dtype=torch.float64)
    for q in range(num_queries):
        for t in range(num_targets):
            label = labels[t]
            if class_cost == "focal":
                p = torch.sigmoid(logits[q, label].double())
                cls = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8) - (1 - alpha) * p**gamma * -torch.log(
                    1 - p + 1e-8
                )
            else:
                cls = -torch.softmax(logits[q].double(), -1)[label]
            l1 = (boxes[q].double() - target_boxes[t].double()).abs().sum()
            giou = generalized_box_iou(
                box_cxcywh_to_xyxy(boxes[q : q + 1].double()), box_cxcywh_to_xyxy(target_boxes[t : t + 1].double())
            )[0, 0]
            cost[q, t] = cls + 5 * l1 - 2 * giou
    return cost


def best_total(cost: torch.Tensor) -> float:
    num_queries, num_targets = cost.shape
    if num_targets == 0:
        return 0.0
    return min(
        sum(cost[q, t].item() for t, q in enumerate(queries))
        for queries in itertools.permutations(range(num_queries), num_targets)
    )


@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
@pytest.mark.parametrize("num_queries,num_targets", [(4, 4), (6, 3), (5, 1), (5, 0), (7, 5)])
def test_matches_brute_force(class_cost, num_queries, num_targets):
    generator = torch.Generator().manual_seed(num_queries * 10 + num_targets)
    num_classes = 4
    columns = num_classes + (1 if class_cost == "softmax" else 0)
    batch = 3
    logits = torch.randn(batch, num_queries, columns, generator=generator) * 2
    boxes = torch.stack([random_boxes(num_queries, generator) for _ in range(batch)])
    # Image 1 always has no targets, to exercise the empty case inside a non-empty batch.
    counts = [num_targets, 0, max(num_targets - 1, 0)]
    targets = [
        {"labels": torch.randint(num_classes, (n,), generator=generator), "boxes": random_boxes(n, generator)}
        for n in counts
    ]
    matcher = HungarianMatcher(class_cost=class_cost)
    indices = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert len(indices) == batch
    for image, (query_index, target_index) in enumerate(indices):
        n = counts[image]
        assert query_index.dtype == torch.int64 and target_index.dtype == torch.int64
        assert len(query_index) == len(target_index) == n
        assert sorted(target_index.tolist()) == list(range(n))
        assert len(set(query_index.tolist())) == n
        assert query_index.tolist() == sorted(query_index.tolist())
        cost = brute_force_cost(logits[image], boxes[image], targets[image]["labels"], targets[image]["boxes"], class_cost)
        total = sum(cost[q, t].item() for q, t in zip(query_index.tolist(), target_index.tolist()))
        assert total == pytest.approx(best_total(cost), abs=1e-4)


def test_cost_matrix_matches_written_out_cost():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 5, 3, generator=generator)
    boxes = random_boxes(5, generator)[None]
    targets = [{"labels": torch.tensor([2, 0]), "boxes": random_boxes(2, generator)}]
    (cost,) = HungarianMatcher().cost_matrices({"pred_logits": logits, "pred_boxes": boxes}, targets)
    expected = brute_force_cost(logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"], "focal")
    torch.testing.assert_close(cost.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_rejected():
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), 0.5)}
    with pytest.raises(ValueError, match="labels"):
        matcher(outputs, [{"labels": torch.tensor([5]), "boxes": torch.full((1, 4), 0.5)}])
    with pytest.raises(ValueError, match="targets"):
        matcher(outputs, [])
    with pytest.raises(ValueError, match="class_cost"):
        HungarianMatcher(class_cost="hinge")


def random_layers(num_layers, batch, num_queries, columns, generator):
    return [
        {
            "pred_logits": torch.randn(batch, num_queries, columns, generator=generator),
            "pred_boxes": torch.stack([random_boxes(num_queries, generator) for _ in range(batch)]),
        }
        for _ in range(num_layers)
    ]


def test_match_layers_equals_matching_each_layer_alone():
    generator = torch.Generator().manual_seed(11)
    layers = random_layers(4, 3, 9, 5, generator)
    counts = [4, 0, 7]
    targets = [
        {"labels": torch.randint(5, (n,), generator=generator), "boxes": random_boxes(n, generator)} for n in counts
    ]
    matcher = HungarianMatcher()
    together = matcher.match_layers(layers, targets)
    assert len(together) == len(layers)
    for layer, indices in zip(layers, together):
        alone = matcher(layer, targets)
        for (query, target), (query_alone, target_alone) in zip(indices, alone, strict=True):
            assert torch.equal(query, query_alone) and torch.equal(target, target_alone)
        for image, matrix in enumerate(matcher.cost_matrices(layer, targets)):
            expected = brute_force_cost(
                layer["pred_logits"][image], layer["pred_boxes"][image], targets[image]["labels"],
                targets[image]["boxes"], "focal",
            )
            torch.testing.assert_close(matrix.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_boxes_and_predictions_are_diagnosed():
    matcher = HungarianMatcher()
    good_boxes = torch.full((1, 3, 4), 0.3)
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": good_boxes}
    target = {"labels": torch.tensor([1]), "boxes": torch.full((1, 4), 0.5)}
    inverted = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, -0.1, 0.2]])}
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] holds a box of negative width"):
        matcher(outputs, [inverted])
    bad_prediction = good_boxes.clone()
    bad_prediction[0, 2, 3] = -0.2
    with pytest.raises(ValueError, match="pred_boxes holds a box of negative width"):
        matcher({"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": bad_prediction}, [target])
    nan_logits = torch.zeros(1, 3, 2)
    nan_logits[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        matcher({"pred_logits": nan_logits, "pred_boxes": good_boxes}, [target])
    with pytest.raises(ValueError, match="one shape"):
        wider = {"pred_logits": torch.zeros(1, 4, 2), "pred_boxes": torch.full((1, 4, 4), 0.3)}
        matcher.match_layers([outputs, wider], [target])
    with pytest.raises(ValueError, match="at least one"):
        matcher.match_layers([], [target])
