"""Post-processing on hand-made logits and boxes."""

import math

import pytest
import torch

from deco.models import PostProcess, postprocess


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _outputs():
    # 2 images, 3 queries, 4 classes. Every score is tiny except the ones placed by hand.
    logits = torch.full((2, 3, 4), _logit(0.001))
    logits[0, 2, 1] = _logit(0.9)  # image 0: best = query 2, class 1
    logits[0, 0, 3] = _logit(0.8)  # then query 0, class 3
    logits[0, 2, 0] = _logit(0.7)  # then query 2 again, class 0
    logits[1, 1, 2] = _logit(0.6)
    boxes = torch.tensor(
        [
            [[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]],
            [[0.5, 0.5, 1.0, 1.0], [0.5, 0.25, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]],
        ]
    )
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_topk_labels_queries_and_scaled_boxes():
    target_sizes = torch.tensor([[100, 200], [50, 40]])  # (height, width)
    results = postprocess(_outputs(), target_sizes, top_k=3)
    assert len(results) == 2
    first = results[0]
    torch.testing.assert_close(first["scores"], torch.tensor([0.9, 0.8, 0.7]))
    assert first["labels"].tolist() == [1, 3, 0]
    # query 2: cxcywh (0.25, 0.75, 0.5, 0.5) -> xyxy (0, 0.5, 0.5, 1.0) -> x * 200, y * 100
    # query 0: (0.5, 0.5, 0.2, 0.4) -> (0.4, 0.3, 0.6, 0.7) -> (80, 30, 120, 70)
    torch.testing.assert_close(
        first["boxes"],
        torch.tensor([[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]]),
    )
    second = results[1]
    assert second["labels"][0].item() == 2
    assert second["scores"][0].item() == pytest.approx(0.6)
    # query 1: (0.5, 0.25, 0.5, 0.5) -> (0.25, 0, 0.75, 0.5) -> x * 40, y * 50
    torch.testing.assert_close(second["boxes"][0], torch.tensor([10.0, 0.0, 30.0, 25.0]))
    assert second["scores"][1:].max().item() == pytest.approx(0.001)


def test_module_default_top_k_and_shapes():
    outputs = {"pred_logits": torch.randn(2, 100, 91), "pred_boxes": torch.rand(2, 100, 4)}
    results = PostProcess()(outputs, torch.tensor([[480, 640], [600, 800]]))
    for result in results:
        assert result["scores"].shape == (100,) and result["labels"].shape == (100,)
        assert result["boxes"].shape == (100, 4)
        assert result["labels"].dtype == torch.int64
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        assert ((result["labels"] >= 0) & (result["labels"] < 91)).all()


def test_bad_arguments_rejected():
    outputs = _outputs()
    with pytest.raises(ValueError, match="target_sizes must be B x 2"):
        postprocess(outputs, torch.tensor([[100, 200]]))
    with pytest.raises(ValueError, match=r"top_k must be in 1..12"):
        postprocess(outputs, torch.tensor([[1, 1], [1, 1]]), top_k=13)
    with pytest.raises(ValueError, match="pred_boxes B x Q x 4"):
        postprocess({"pred_logits": outputs["pred_logits"], "pred_boxes": torch.rand(2, 3, 5)}, torch.ones(2, 2))
