"""The synthetic shapes dataset: byte-identical per seed, the promised content, loadable as COCO."""

import hashlib
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from deco.cli import main as deco_main
from deco.data import build_dataset
from deco.data.synthetic import CATEGORIES, write_synthetic_dataset
from deco.data.transforms import Normalize


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_same_seed_gives_identical_files(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_synthetic_dataset(tmp_path / name, 6, seed, (64, 80), progress=False)
    first, second, other = (_hashes(tmp_path / name) for name in "abc")
    assert len(first) == 6 + 2
    assert first == second
    assert first.keys() == other.keys() and first != other


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    summary = write_synthetic_dataset(root, 40, seed=0, image_size=(128, 144), progress=False)
    assert summary["train"]["images"] == 32 and summary["val"]["images"] == 8
    return root


def _load(root, split):
    return json.loads((root / f"instances_{split}.json").read_text())


def test_content(dataset_root):
    train, val = _load(dataset_root, "train"), _load(dataset_root, "val")
    assert train["categories"] == val["categories"] == [dict(c) for c in CATEGORIES]
    assert len({c["name"] for c in CATEGORIES}) == len(CATEGORIES) >= 3

    train_ids = {image["id"] for image in train["images"]}
    val_ids = {image["id"] for image in val["images"]}
    assert not train_ids & val_ids and train_ids | val_ids == set(range(1, 41))

    annotations = train["annotations"] + val["annotations"]
    assert {a["category_id"] for a in annotations} == {c["id"] for c in CATEGORIES}
    assert len({a["id"] for a in annotations}) == len(annotations)
    images_with_objects = {a["image_id"] for a in annotations}
    assert 0 < len(set(range(1, 41)) - images_with_objects) < 20  # some images are empty, most are not
    per_image = np.bincount([a["image_id"] for a in annotations])
    assert per_image.max() >= 2  # objects share images (and may overlap)
    for annotation in annotations:
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 144 and y + h <= 128
        # large enough for a stride-32 model: each side at least 0.3 of the shorter image side
        assert min(w, h) >= 0.3 * 128 - 1
        assert 0 < annotation["area"] <= w * h


def test_rectangle_fills_its_box_exactly(dataset_root):
    """A lone rectangle's box edges lie on its outermost pixel rows and columns: each edge line inside the
    box has the rectangle's colour, the line just outside (where there is one) has not."""
    train = _load(dataset_root, "train")
    counts = np.bincount([a["image_id"] for a in train["annotations"]])
    annotation = next(a for a in train["annotations"] if a["category_id"] == 1 and counts[a["image_id"]] == 1)
    image = Image.open(dataset_root / "images" / f"{annotation['image_id']:06d}.png")
    assert image.size == (144, 128) and image.mode == "RGB"
    pixels = np.asarray(image, dtype=np.float32)
    x, y, w, h = annotation["bbox"]
    colour = np.median(pixels[y : y + h, x : x + w].reshape(-1, 3), axis=0)
    edges = {
        "left": (pixels[y : y + h, x], pixels[y : y + h, x - 1] if x > 0 else None),
        "right": (pixels[y : y + h, x + w - 1], pixels[y : y + h, x + w] if x + w < 144 else None),
        "top": (pixels[y, x : x + w], pixels[y - 1, x : x + w] if y > 0 else None),
        "bottom": (pixels[y + h - 1, x : x + w], pixels[y + h, x : x + w] if y + h < 128 else None),
    }
    for name, (inner, outer) in edges.items():
        assert np.abs(inner.mean(axis=0) - colour).max() < 15, name
        if outer is not None:
            assert np.linalg.norm(outer.mean(axis=0) - colour) > 30, name


def test_loads_through_build_dataset(dataset_root):
    dataset = build_dataset(dataset_root, "val", train=False, transforms=Normalize())
    assert len(dataset) == 8
    assert [c["name"] for c in dataset.categories] == ["rectangle", "ellipse", "triangle"]
    val = _load(dataset_root, "val")
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, 128, 144)
        annotations = [a for a in val["annotations"] if a["image_id"] == target["image_id"]]
        assert target["labels"].tolist() == [a["category_id"] - 1 for a in annotations]
        assert ((target["boxes"] > 0) & (target["boxes"] <= 1)).all()
    train_dataset = build_dataset(dataset_root, "train", train=True)
    image, target = train_dataset[0]
    assert image.dim() == 3 and target["boxes"].dtype == torch.float32


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images must be at least 1"):
        write_synthetic_dataset(tmp_path, 0, 0)
    with pytest.raises(ValueError, match="image_size must be at least 32 x 32"):
        write_synthetic_dataset(tmp_path, 2, 0, (16, 64))
    with pytest.raises(ValueError, match="val_fraction must be in"):
        write_synthetic_dataset(tmp_path, 2, 0, val_fraction=1.0)


def test_synth_command_reports_bad_arguments(tmp_path, caplog):
    assert deco_main(["synth", "--out", str(tmp_path), "--images", "0"]) == 1
    assert any("deco synth: num_images must be at least 1" in r.getMessage() for r in caplog.records)


def test_synth_command(tmp_path):
    assert deco_main(["synth", "--out", str(tmp_path), "--images", "3", "--seed", "2", "--size", "48", "64"]) == 0
    train, val = _load(tmp_path, "train"), _load(tmp_path, "val")
    assert len(train["images"]) == 2 and len(val["images"]) == 1
    assert train["images"][0]["height"] == 48 and train["images"][0]["width"] == 64
    assert len(list((tmp_path / "images").glob("*.png"))) == 3


def test_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result must still be readable by others."""
    write_synthetic_dataset(tmp_path, 2, 0, (32, 32), progress=False)
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "instances_train.json", tmp_path / "images" / "000001.png"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
