"""Box conversions, IoU and GIoU against hand-computed values."""

import pytest
import torch

from deco.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)


def test_cxcywh_xyxy_round_trip_and_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)


def test_conversions_keep_leading_dimensions():
    boxes = torch.rand(2, 3, 4)
    assert box_cxcywh_to_xyxy(boxes).shape == (2, 3, 4)
    assert box_area(box_cxcywh_to_xyxy(boxes)).shape == (2, 3)


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([6.0, 0.0]))


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor(
        [
            [1.0, 1.0, 3.0, 3.0],  # overlap 1, union 4 + 4 - 1 = 7
            [0.0, 0.0, 2.0, 2.0],  # identical
            [3.0, 3.0, 4.0, 4.0],  # disjoint, union 4 + 1
            [0.0, 0.0, 1.0, 2.0],  # contained: overlap 2, union 4
        ]
    )
    iou, union = box_iou(a, b)
    assert iou.shape == union.shape == (1, 4)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0, 0.5]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0, 5.0, 4.0]]))


def test_generalized_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    giou = generalized_box_iou(a, b)
    expected = torch.tensor(
        [
            # enclosing 3x3 = 9, union 7: 1/7 - 2/9; enclosing 3x2 = 6, union 4 + 1 - 0 = 5: 0 - 1/6
            [1 / 7 - 2 / 9, -1 / 6],
            # enclosing 3x3, union 1 + 4 - 0 = 5: -4/9; enclosing 3x1 = 3, union 2: -1/3
            [-4 / 9, -1 / 3],
        ]
    )
    torch.testing.assert_close(giou, expected)


def test_generalized_box_iou_far_apart_tends_to_minus_one():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1000.0, 1000.0, 1001.0, 1001.0]])
    assert generalized_box_iou(a, b).item() == pytest.approx(-1.0, abs=1e-5)


def test_degenerate_boxes_give_no_nan_in_value_or_gradient():
    points = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.8]], requires_grad=True)
    other = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])
    giou = generalized_box_iou(points, other)
    assert torch.isfinite(giou).all()
    # A point against the same point: no union, no enclosing box: IoU 0, GIoU 0 (eps-clamped).
    assert giou[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    # A point inside a unit box: IoU 0, enclosing = the unit box, union 1: GIoU 0 - (1 - 1) / 1 = 0.
    assert giou[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    # A vertical segment vs the point at (0.5, 0.5): enclosing 0.3 x 0.6 = 0.18 > eps, union ~0: GIoU ~ -1.
    assert giou[1, 0].item() == pytest.approx(-1.0, abs=1e-5)
    iou, _ = box_iou(points, other)
    assert torch.isfinite(iou).all() and iou[0, 0].item() == 0.0
    giou.sum().backward()
    assert torch.isfinite(points.grad).all()


def test_generalized_box_iou_rejects_inverted_boxes_and_bad_shapes():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="boxes2 holds an inverted box"):
        generalized_box_iou(good, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"boxes1 must be an N x 4 tensor.*\(4,\)"):
        generalized_box_iou(good[0], good)
    with pytest.raises(ValueError, match="boxes2 must be an N x 4"):
        box_iou(good, torch.zeros(1, 5))


def test_empty_inputs():
    iou, union = box_iou(torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert iou.shape == union.shape == (0, 1)
    assert generalized_box_iou(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.zeros(0, 4)).shape == (1, 0)


def test_elementwise_generalized_box_iou_is_the_pairwise_diagonal():
    generator = torch.Generator().manual_seed(3)
    centre = torch.rand(2, 5, 2, generator=generator, dtype=torch.float64)
    size = torch.rand(2, 5, 2, generator=generator, dtype=torch.float64) * 0.5
    boxes1 = box_cxcywh_to_xyxy(torch.cat([centre, size], -1))
    boxes2 = box_cxcywh_to_xyxy(torch.cat([centre.flip(1), size * 2], -1))
    boxes2[0, 0] = boxes1[0, 0]  # identical boxes: GIoU 1
    giou = elementwise_generalized_box_iou(boxes1, boxes2)
    assert giou.shape == (2, 5)
    for row in range(2):
        torch.testing.assert_close(giou[row], torch.diag(generalized_box_iou(boxes1[row], boxes2[row])))
    assert giou[0, 0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"one shape; got \(2, 5, 4\) and \(5, 4\)"):
        elementwise_generalized_box_iou(boxes1, boxes2[0])
    with pytest.raises(ValueError, match="boxes1 holds an inverted box"):
        elementwise_generalized_box_iou(boxes1.flip(-1), boxes2)
