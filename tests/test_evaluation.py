"""CocoEvaluator and the evaluation loop against hand-made ground truth."""

import contextlib
import io
import json
import multiprocessing

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import nn

from deco.data import build_dataset, collate_fn, make_transforms
from deco.evaluation import METRIC_NAMES, CocoEvaluator, evaluate, format_metrics

CATEGORIES = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]
# image id -> (size, [(category id, xywh)]): one small (< 32^2), medium and large box per area range
GROUND_TRUTH = {
    1: (200, [(5, [10, 10, 20, 20]), (9, [60, 50, 50, 60])]),
    2: (200, [(9, [20, 30, 120, 110])]),
    3: (200, [(5, [100, 100, 15, 25]), (5, [20, 120, 60, 40])]),
}


def _coco_gt():
    document = {"images": [], "annotations": [], "categories": CATEGORIES}
    for image_id, (size, boxes) in GROUND_TRUTH.items():
        document["images"].append({"id": image_id, "file_name": f"{image_id}.png", "height": size, "width": size})
        for category_id, (x, y, w, h) in boxes:
            document["annotations"].append(
                {
                    "id": len(document["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = document
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _predictions(image_ids=GROUND_TRUTH, shift=0.0, swap_labels=False):
    """Ground-truth boxes as detections (xyxy), moved right by ``shift`` x their width."""
    label_of = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    predictions = {}
    for image_id in image_ids:
        boxes = GROUND_TRUTH[image_id][1]
        xyxy = [[x + shift * w, y, x + w + shift * w, y + h] for _, (x, y, w, h) in boxes]
        labels = [label_of[c] for c, _ in boxes]
        if swap_labels:
            labels = [1 - label for label in labels]
        predictions[image_id] = {
            "scores": torch.linspace(0.9, 0.5, len(boxes)),
            "labels": torch.tensor(labels),
            "boxes": torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
        }
    return predictions


def test_perfect_predictions_score_one():
    evaluator = CocoEvaluator(_coco_gt(), CATEGORIES)
    evaluator.update(_predictions())
    metrics = evaluator.summarize()
    assert list(metrics) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        if name != "AR1":
            assert metrics[name] == pytest.approx(1.0), name
    # AR1 allows one detection per image and category: image 3 holds two boxes of category 5, so that
    # category recalls 2 of its 3 boxes; category 9 recalls both. Mean over categories: (2/3 + 1) / 2.
    assert metrics["AR1"] == pytest.approx(5 / 6)


def test_shifted_boxes_score_lower():
    evaluator = CocoEvaluator(_coco_gt(), CATEGORIES)
    evaluator.update(_predictions(shift=0.2))  # IoU = 0.8 / 1.2 = 0.667: a hit at 0.5, a miss at 0.75
    metrics = evaluator.summarize()
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert 0.0 < metrics["AP"] < 0.5


def test_wrong_labels_score_zero():
    evaluator = CocoEvaluator(_coco_gt(), CATEGORIES)
    evaluator.update(_predictions(swap_labels=True))
    assert evaluator.summarize()["AP"] == pytest.approx(0.0)


def test_no_predictions_at_all():
    evaluator = CocoEvaluator(_coco_gt(), CATEGORIES)
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    evaluator.update({image_id: empty for image_id in GROUND_TRUTH})
    metrics = evaluator.summarize()
    assert all(value == 0.0 for value in metrics.values()), metrics


def test_only_evaluated_images_count():
    evaluator = CocoEvaluator(_coco_gt(), CATEGORIES)
    evaluator.update(_predictions(image_ids=[2]))
    assert evaluator.image_ids == [2]
    assert evaluator.summarize()["AP"] == pytest.approx(1.0)


def test_first_update_of_an_image_wins():
    evaluator = CocoEvaluator(_coco_gt(), CATEGORIES)
    evaluator.update(_predictions())
    evaluator.update(_predictions(shift=0.4))
    assert evaluator.summarize()["AP"] == pytest.approx(1.0)


def test_summarize_is_silent_and_logs_the_table_when_asked(capsys, caplog):
    evaluator = CocoEvaluator(_coco_gt(), CATEGORIES)
    evaluator.update(_predictions())
    with caplog.at_level("INFO", logger="deco.evaluation"):
        metrics = evaluator.summarize()
        assert capsys.readouterr().out == ""
        assert not caplog.records
        evaluator.summarize(log_table=True)
    assert capsys.readouterr().out == ""
    assert len(caplog.records) == 1 and format_metrics(metrics) in caplog.records[0].getMessage()


def test_bad_input_is_rejected():
    evaluator = CocoEvaluator(_coco_gt(), CATEGORIES)
    with pytest.raises(RuntimeError, match="no image has been evaluated"):
        evaluator.summarize()
    good = _predictions(image_ids=[1])[1]
    with pytest.raises(ValueError, match="image_id 77 is not in the ground truth"):
        evaluator.update({77: good})
    with pytest.raises(ValueError, match="expected scores N, labels N and boxes N x 4"):
        evaluator.update({1: {**good, "boxes": good["boxes"][:, :3]}})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        evaluator.update({1: {**good, "labels": torch.tensor([0, 2])}})
    with pytest.raises(ValueError, match="none of the category ids"):
        CocoEvaluator(_coco_gt(), [{"id": 1, "name": "x"}])


class _ConstantDetector(nn.Module):
    """Predicts the same normalised box (query 0, label 0) for every image, whatever its size."""

    def __init__(self, box_cxcywh):
        super().__init__()
        self.register_buffer("box", torch.tensor(box_cxcywh))
        self.seen_training = []

    def forward(self, images, mask):
        self.seen_training.append(self.training)
        batch = images.shape[0]
        logits = torch.full((batch, 3, 2), -10.0)
        logits[:, 0, 0] = 10.0
        boxes = torch.full((batch, 3, 4), 0.1)
        boxes[:, 0] = self.box
        return {"pred_logits": logits, "pred_boxes": boxes}


def _write_constant_box_dataset(root):
    """Three images of different sizes, each with one box of label 0 at the same relative place (centre
    (0.5, 0.625), size 0.5 x 0.25)."""
    document = {"images": [], "annotations": [], "categories": CATEGORIES}
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image_id, (height, width) in enumerate([(40, 60), (90, 50), (64, 64)], start=1):
        document["images"].append({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width})
        document["annotations"].append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 5,
                "bbox": [0.25 * width, 0.5 * height, 0.5 * width, 0.25 * height],
                "area": 0.125 * width * height,
                "iscrowd": 0,
            }
        )
        Image.new("RGB", (width, height)).save(root / "images" / f"{image_id}.png")
    (root / "instances_val.json").write_text(json.dumps(document))


def _load_constant_box_dataset(root):
    """The dataset of :func:`_write_constant_box_dataset`, resized to a shorter side of 32 for the model."""
    return build_dataset(root, "val", train=False, transforms=make_transforms(False, eval_size=32))


def _distributed_worker(rank, world_size, init_file, image_ids, shifted_image_ids, dataset_root, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        evaluator = CocoEvaluator(_coco_gt(), CATEGORIES)
        evaluator.update(_predictions(image_ids=image_ids))
        evaluator.update(_predictions(image_ids=shifted_image_ids, shift=0.4))
        evaluator.synchronize()
        result = {"image_ids": evaluator.image_ids, "metrics": evaluator.summarize()}

        # The evaluation loop over a sharded loader (3 images on 2 ranks: the sampler pads with a repeat).
        dataset = _load_constant_box_dataset(dataset_root)
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=collate_fn)
        loop_evaluator = CocoEvaluator(dataset.coco, dataset.categories)
        model = _ConstantDetector([0.5, 0.625, 0.5, 0.25])
        result["loop_metrics"] = evaluate(model, loader, loop_evaluator, "cpu", progress=False)
        result["loop_batches"] = len(model.seen_training)
        with open(out_file, "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_evaluation_merges_ranks_without_duplicates(tmp_path):
    # Rank 1 repeats image 1, as a DistributedSampler pads; its copy has wrong boxes and must be dropped
    # (the lowest rank's copy is kept).
    context = multiprocessing.get_context("fork")
    shards = (([1, 2], []), ([3], [1]))
    _write_constant_box_dataset(tmp_path / "data")
    processes = []
    for rank, (image_ids, shifted_image_ids) in enumerate(shards):
        out_file = tmp_path / f"rank{rank}.json"
        args = (rank, 2, tmp_path / "init", image_ids, shifted_image_ids, tmp_path / "data", out_file)
        processes.append(context.Process(target=_distributed_worker, args=args))
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        if process.is_alive():  # a hung collective: do not leave the worker behind
            process.kill()
            process.join()
        assert process.exitcode == 0
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["image_ids"] == [1, 2, 3]
        assert result["metrics"]["AP"] == pytest.approx(1.0)
        assert result["loop_batches"] == 2  # each rank saw its own half of the (padded) data
        assert result["loop_metrics"]["AP"] == pytest.approx(1.0)


def test_evaluate_loop_scales_to_original_sizes(tmp_path):
    """Images of different sizes with one box at the same relative place: a constant detector is perfect
    only if detections are scaled to each original image size (the model sees them resized)."""
    _write_constant_box_dataset(tmp_path)
    dataset = _load_constant_box_dataset(tmp_path)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    model = _ConstantDetector([0.5, 0.625, 0.5, 0.25]).train()

    metrics = evaluate(model, loader, CocoEvaluator(dataset.coco, dataset.categories), "cpu", progress=False)
    assert metrics["AP"] == pytest.approx(1.0)
    assert model.seen_training == [False, False] and model.training

    model = _ConstantDetector([0.5, 0.5, 0.5, 0.25])  # a quarter of the box height too high: IoU 0.33
    metrics = evaluate(model, loader, CocoEvaluator(dataset.coco, dataset.categories), "cpu", progress=False)
    assert metrics["AP50"] == pytest.approx(0.0)
