"""Commands that run a checkpoint: ``deco predict`` (drawing, detections JSON) and ``deco eval``, plus
checkpoint loading errors. The checkpoint is a tiny ``build_deco`` model with random weights."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deco.cli import main as deco_main
from deco.commands.eval import load_model
from deco.commands.predict import PALETTE, _output_names, draw_detections
from deco.data.synthetic import CATEGORIES, write_synthetic_dataset
from deco.evaluation import METRIC_NAMES, load_model_checkpoint
from deco.models import build_deco

TINY_MODEL = {
    "backbone": "resnet18",
    "num_classes": 3,
    "num_queries": 4,
    "query_grid": (2, 2),
    "kernels": "stock",
    "d_model": 32,
    "encoder_dims": (32,),
    "encoder_depths": (1,),
    "num_decoder_layers": 1,
    "backbone_norm": "batch",
}


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pth"
    torch.manual_seed(0)
    model = build_deco(**TINY_MODEL)
    categories = [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
    torch.save(
        {
            "model": model.state_dict(),
            "model_config": TINY_MODEL,
            "categories": categories,
            "config": {"eval_size": 64, "max_size": 96},
        },
        path,
    )
    return path


def test_draw_detections_outlines_boxes_in_the_category_colour():
    image = Image.new("RGB", (120, 100), (128, 128, 128))
    detections = [{"box": [20.0, 40.0, 80.0, 90.0], "label": 1, "name": "ellipse", "score": 0.75}]
    drawn = draw_detections(image, detections)
    assert image.getpixel((20, 60)) == (128, 128, 128)  # the input is not modified
    assert drawn.size == image.size
    for point in ((20, 60), (80, 60), (50, 90)):
        assert drawn.getpixel(point) == PALETTE[1], point
    assert drawn.getpixel((50, 65)) == (128, 128, 128)  # inside the box, away from the caption
    caption_area = np.asarray(drawn.crop((20, 26, 80, 40)))
    # a caption background in the box colour with (antialiased) white text on it
    assert (caption_area == PALETTE[1]).all(axis=-1).any() and (caption_area > 220).all(axis=-1).any()


def test_first_detection_is_drawn_on_top():
    detections = [
        {"box": [10, 20, 50, 50], "label": 0, "name": "best", "score": 0.9},
        {"box": [10, 20, 50, 50], "label": 1, "name": "worse", "score": 0.5},
    ]
    assert draw_detections(Image.new("RGB", (60, 60)), detections).getpixel((10, 35)) == PALETTE[0]


def test_caption_moves_inside_when_the_box_touches_the_top():
    drawn = draw_detections(Image.new("RGB", (60, 60)), [{"box": [0, 0, 50, 50], "label": 0, "name": "r", "score": 1}])
    assert drawn.getpixel((1, 3)) == PALETTE[0]


def test_output_names_are_unique():
    paths = [Path("a/x.jpg"), Path("b/x.png"), Path("c/y.jpg"), Path("x.bmp")]
    assert _output_names(paths) == ["x.png", "x_1.png", "y.png", "x_2.png"]


def test_predict_writes_drawn_images_and_json(tmp_path, checkpoint_path):
    inputs = []
    for name, size in (("one.png", (90, 70)), ("two.jpg", (64, 64))):
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(
            tmp_path / name
        )
        inputs.append(str(tmp_path / name))
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(checkpoint_path), *inputs, "--out", str(out), "--device", "cpu"]
    assert deco_main([*args, "--threshold", "0"]) == 0

    report = json.loads((out / "detections.json").read_text())
    assert [entry["image"] for entry in report] == inputs
    for entry, expected_size in zip(report, ((90, 70), (64, 64))):
        drawn = Image.open(entry["output"])
        assert drawn.size == expected_size
        assert (entry["width"], entry["height"]) == expected_size
        detections = entry["detections"]
        assert len(detections) == 4 * 3  # threshold 0 keeps every (query, class) pair of the tiny model
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True)
        for detection in detections:
            assert detection["name"] == CATEGORIES[detection["label"]]["name"]
            assert detection["category_id"] == CATEGORIES[detection["label"]]["id"]
            x0, y0, x1, y1 = detection["box"]
            assert 0 <= x0 <= x1 <= expected_size[0] and 0 <= y0 <= y1 <= expected_size[1]
        assert not np.array_equal(np.asarray(drawn), np.asarray(Image.open(entry["image"]).convert("RGB")))

    assert deco_main([*args, "--threshold", "1"]) == 0  # sigmoid scores stay below 1
    report = json.loads((out / "detections.json").read_text())
    assert all(entry["detections"] == [] for entry in report)


def test_predict_names_an_unreadable_image(tmp_path, checkpoint_path, caplog):
    (tmp_path / "broken.png").write_bytes(b"nope")
    args = ["predict", "--checkpoint", str(checkpoint_path), str(tmp_path / "broken.png"), "--out", str(tmp_path)]
    assert deco_main([*args, "--device", "cpu"]) == 1
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("deco predict:" in m and "broken.png cannot be decoded" in m for m in messages)


def test_eval_names_a_missing_checkpoint(tmp_path, caplog):
    args = ["eval", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "none.pth"), "--device", "cpu"]
    assert deco_main(args) == 1
    assert any("deco eval: checkpoint" in r.getMessage() and "none.pth does not exist" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_eval_command_writes_the_metrics(tmp_path, checkpoint_path):
    write_synthetic_dataset(tmp_path / "data", 6, seed=3, image_size=(64, 64), progress=False)
    out = tmp_path / "metrics.json"
    args = ["eval", "--data", str(tmp_path / "data"), "--checkpoint", str(checkpoint_path), "--out", str(out)]
    assert deco_main([*args, "--device", "cpu", "--num-workers", "0", "--batch-size", "2", "--kernels", "stock"]) == 0
    metrics = json.loads(out.read_text())
    assert list(metrics) == list(METRIC_NAMES)
    assert all(-1.0 <= value <= 1.0 for value in metrics.values())


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*missing\.pth does not exist"):
        load_model_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"checkpoint .*corrupt\.pth cannot be read"):
        load_model_checkpoint(tmp_path / "corrupt.pth")
    torch.save({"model": {}}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth lacks \['model_config', 'categories'\]"):
        load_model_checkpoint(tmp_path / "partial.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth holds a list"):
        load_model_checkpoint(tmp_path / "list.pth")


def test_kernels_override_rebuilds_with_the_same_weights(checkpoint_path):
    checkpoint = load_model_checkpoint(checkpoint_path)
    checkpoint["model_config"] = {**checkpoint["model_config"], "kernels": "fused"}
    model = load_model(argparse.Namespace(kernels="stock", channels_last=None), checkpoint, torch.device("cpu"))
    assert model.config["kernels"] == "stock" and not model.training
    assert all(torch.equal(value, checkpoint["model"][key]) for key, value in model.state_dict().items())
    default = load_model(argparse.Namespace(kernels=None, channels_last=None), checkpoint, torch.device("cpu"))
    assert default.config["kernels"] == "fused"


def _stem_is_channels_last(model) -> bool:
    stem = model.backbone.body.conv1.weight  # 64 x 3 x 7 x 7: the two layouts differ
    return stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()


def test_channels_last_follows_the_training_config_unless_given(checkpoint_path):
    checkpoint = load_model_checkpoint(checkpoint_path)

    def load(channels_last):
        return load_model(argparse.Namespace(kernels=None, channels_last=channels_last), checkpoint, torch.device("cpu"))

    assert not _stem_is_channels_last(load(None))
    checkpoint["config"] = {**checkpoint["config"], "channels_last": True}
    model = load(None)
    assert _stem_is_channels_last(model)
    assert all(torch.equal(value, checkpoint["model"][key]) for key, value in model.state_dict().items())
    assert not _stem_is_channels_last(load(False))
