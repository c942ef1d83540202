"""COCO-format loading: targets, label mapping, layouts, batching, and clear errors on bad input."""

import json

import pytest
import torch
from PIL import Image

from deco.data import build_dataset, collate_fn
from deco.data.coco import CocoDetection
from deco.data.transforms import Normalize


def _coco_document():
    """Two images (60 x 80 and 40 x 50), categories with non-contiguous ids in non-sorted order."""
    return {
        "images": [
            {"id": 12, "file_name": "b.png", "height": 40, "width": 50},
            {"id": 5, "file_name": "a.png", "height": 60, "width": 80},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [8, 6, 16, 30], "area": 480, "iscrowd": 0},
            # reaches past the right and bottom edges: clipped to (70, 50, 80, 60)
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [70, 50, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 1},
            {"id": 4, "image_id": 5, "category_id": 7, "bbox": [30, 30, 0, 10], "area": 0, "iscrowd": 0},
            {"id": 5, "image_id": 12, "category_id": 3, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0},
        ],
    }


def _write_dataset(root, document=None, annotation_name="instances_val.json", image_dir_name="images"):
    document = _coco_document() if document is None else document
    image_dir = root / image_dir_name
    image_dir.mkdir(parents=True, exist_ok=True)
    for info in document["images"]:
        Image.new("RGB", (info["width"], info["height"]), (200, 100, 50)).save(image_dir / info["file_name"])
    annotation_file = root / annotation_name
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(document))
    return annotation_file


def test_items_hold_clipped_normalised_boxes_and_contiguous_labels(tmp_path):
    _write_dataset(tmp_path)
    dataset = build_dataset(tmp_path, "val", train=False, transforms=Normalize())
    assert len(dataset) == 2
    assert dataset.categories == [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    assert len(dataset.coco.getAnnIds()) == 5  # the COCO object keeps crowd and degenerate boxes for COCOeval

    image, target = dataset[0]  # image ids ascending: 5 first
    assert image.shape == (3, 60, 80) and image.dtype == torch.float32
    assert target["image_id"] == 5
    assert target["orig_size"].tolist() == [60, 80] and target["size"].tolist() == [60, 80]
    assert target["orig_size"].dtype == torch.int64
    # dog (8, 6, 24, 36) -> cx 16 / 80, cy 21 / 60, w 16 / 80, h 30 / 60; cat clipped to (70, 50, 80, 60).
    # The crowd box and the zero-width box are gone.
    expected = torch.tensor([[0.2, 0.35, 0.2, 0.5], [0.9375, 55 / 60, 0.125, 10 / 60]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [1, 0] and target["labels"].dtype == torch.int64

    _, target = dataset[1]
    assert target["image_id"] == 12
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.3, 0.375, 0.4, 0.25]]))
    assert target["labels"].tolist() == [0]


def test_default_transforms_resize_for_evaluation(tmp_path):
    _write_dataset(tmp_path)
    image, target = build_dataset(tmp_path, "val", train=False)[0]
    assert image.shape == (3, 800, 1066)
    assert target["size"].tolist() == [800, 1066] and target["orig_size"].tolist() == [60, 80]
    torch.testing.assert_close(target["boxes"][0], torch.tensor([0.2, 0.35, 0.2, 0.5]), atol=1e-3, rtol=0)


def test_standard_coco_2017_layout(tmp_path):
    _write_dataset(tmp_path, annotation_name="annotations/instances_val2017.json", image_dir_name="val2017")
    dataset = build_dataset(tmp_path, "val", train=True)
    assert dataset.image_dir == tmp_path / "val2017"
    image, target = dataset[0]
    assert image.dim() == 3 and target["boxes"].shape[1] == 4


def test_missing_split_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_test\.json.*instances_test2017\.json"):
        build_dataset(tmp_path, "test", train=False)


def test_missing_image_folder(tmp_path):
    (tmp_path / "instances_val.json").write_text(json.dumps(_coco_document()))
    with pytest.raises(FileNotFoundError, match="image folder .*images"):
        build_dataset(tmp_path, "val", train=False)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file .*nothere.json does not exist"):
        CocoDetection(tmp_path / "nothere.json", tmp_path)


def test_corrupt_annotation_json(tmp_path):
    annotation_file = _write_dataset(tmp_path)
    annotation_file.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"instances_val\.json is not valid JSON"):
        build_dataset(tmp_path, "val", train=False)


def test_unknown_category(tmp_path):
    document = _coco_document()
    document["annotations"][1]["category_id"] = 99
    _write_dataset(tmp_path, document)
    with pytest.raises(ValueError, match=r"instances_val\.json: annotation 2 has category_id 99"):
        build_dataset(tmp_path, "val", train=False)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, "3", 4], [1, 2, float("nan"), 4], None])
def test_box_without_four_numbers(tmp_path, bbox):
    document = _coco_document()
    document["annotations"][0]["bbox"] = bbox
    _write_dataset(tmp_path, document)
    with pytest.raises(ValueError, match=r"instances_val\.json: annotation 1 has bbox .*expected 4 finite numbers"):
        build_dataset(tmp_path, "val", train=False)


def test_annotation_of_unknown_image(tmp_path):
    document = _coco_document()
    document["annotations"][0]["image_id"] = 404
    _write_dataset(tmp_path, document)
    with pytest.raises(ValueError, match="annotation 1 refers to unknown image_id 404"):
        build_dataset(tmp_path, "val", train=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_undecodable_image_fails_when_loaded(tmp_path, damage):
    _write_dataset(tmp_path)
    path = tmp_path / "images" / "b.png"
    if damage == "garbage":
        path.write_bytes(b"this is not a png")
    else:
        noisy = Image.frombytes("RGB", (50, 40), bytes(range(256)) * 23 + bytes(112))
        noisy.save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dataset = build_dataset(tmp_path, "val", train=False, transforms=Normalize())
    dataset[0]  # a.png is fine
    with pytest.raises(ValueError, match=r"image file .*b\.png cannot be decoded"):
        dataset[1]


def test_missing_image_file_fails_when_loaded(tmp_path):
    _write_dataset(tmp_path)
    (tmp_path / "images" / "a.png").unlink()
    dataset = build_dataset(tmp_path, "val", train=False)
    with pytest.raises(FileNotFoundError, match=r"image file .*a\.png does not exist"):
        dataset[0]


def test_image_size_disagreeing_with_annotations(tmp_path):
    _write_dataset(tmp_path)
    Image.new("RGB", (30, 20)).save(tmp_path / "images" / "a.png")
    dataset = build_dataset(tmp_path, "val", train=False)
    with pytest.raises(ValueError, match=r"a\.png is 20 x 30 pixels but .*says 60 x 80"):
        dataset[0]


def test_collate_pads_and_masks():
    first = torch.randn(3, 4, 6)
    second = torch.randn(3, 5, 3)
    targets = [{"image_id": 1}, {"image_id": 2}]
    images, mask, out_targets = collate_fn([(first, targets[0]), (second, targets[1])])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :4, :6], first) and torch.equal(images[1, :, :5, :3], second)
    assert not images[0, :, 4:].any() and not images[1, :, :, 3:].any()
    expected_mask = torch.ones(2, 5, 6, dtype=torch.bool)
    expected_mask[0, :4, :6] = False
    expected_mask[1, :5, :3] = False
    assert torch.equal(mask, expected_mask)
    assert out_targets == targets


def test_collate_rejects_mismatched_images():
    with pytest.raises(ValueError, match="batch item 1: image has 1 channels"):
        collate_fn([(torch.zeros(3, 2, 2), {}), (torch.zeros(1, 2, 2), {})])
    with pytest.raises(ValueError, match="batch item 0: expected a 3-D"):
        collate_fn([(torch.zeros(2, 2), {})])
