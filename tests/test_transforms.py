"""DETR transforms: boxes stay right through resize, flip, crop and the random train pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from deco.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    crop,
    hflip,
    make_transforms,
    resize,
    resized_shape,
)


def _target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if labels is None:
        labels = list(range(len(boxes)))
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "image_id": 7}


def _gradient_image(height, width):
    """An RGB image whose pixels are all different, so that geometric errors show."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack(((xs * 3) % 256, (ys * 5) % 256, (xs + ys) % 256), axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _rectangle_image(height, width, box):
    """Black image with a white filled rectangle covering pixel-edge box (x0, y0, x1, y1)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels, "RGB")


@pytest.mark.parametrize(
    ("hw", "shorter", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1066)),  # int(800 * 640 / 480)
        ((640, 480), 800, 1333, (1066, 800)),
        ((100, 400), 800, 1333, (333, 1332)),  # 4:1 would reach 3200: shorter side round(1333 / 4) = 333
        ((100, 400), 800, None, (800, 3200)),
        ((128, 128), 96, 213, (96, 96)),
        ((128, 160), 128, 1333, (128, 160)),  # already there
    ],
)
def test_resized_shape_hand_computed(hw, shorter, max_size, expected):
    assert resized_shape(*hw, shorter, max_size) == expected


def test_resize_scales_boxes_and_image():
    image = _gradient_image(100, 200)
    out, target = resize(image, _target([[10, 20, 50, 60], [0, 0, 200, 100]]), 50)
    assert out.size == (100, 50)  # PIL: (width, height)
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 10, 25, 30], [0, 0, 100, 50]]))
    assert target["size"].tolist() == [50, 100]
    assert target["labels"].tolist() == [0, 1] and target["image_id"] == 7


def test_resize_respects_max_size():
    image = _gradient_image(100, 400)
    out, target = resize(image, _target([[0, 0, 400, 100]]), 800, max_size=1333)
    assert out.size == (1332, 333)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 1332.0, 333.0]]))


def test_hflip_hand_computed_and_twice_is_identity():
    image = _gradient_image(100, 200)
    original = _target([[10, 20, 50, 60], [0, 0, 200, 100]])
    flipped_image, flipped = hflip(image, original)
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[150.0, 20, 190, 60], [0, 0, 200, 100]]))
    assert flipped_image.getpixel((0, 5)) == image.getpixel((199, 5))
    back_image, back = hflip(flipped_image, flipped)
    torch.testing.assert_close(back["boxes"], original["boxes"])
    assert np.array_equal(np.asarray(back_image), np.asarray(image))


def test_crop_shifts_clips_and_removes_boxes():
    image = _gradient_image(100, 200)
    boxes = [[10, 10, 50, 50], [150, 60, 190, 90], [0, 0, 5, 5], [40, 30, 120, 60]]
    out, target = crop(image, _target(boxes, [3, 1, 2, 0]), top=20, left=30, height=50, width=100)
    assert out.size == (100, 50)
    assert out.getpixel((0, 0)) == image.getpixel((30, 20))
    assert out.getpixel((99, 49)) == image.getpixel((129, 69))
    # box 0 loses its top-left corner; box 1 lands on the right edge (zero width) and box 2 outside: removed;
    # box 3 is clipped on the right.
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0, 20, 30], [10, 10, 90, 40]]))
    assert target["labels"].tolist() == [3, 0]
    assert target["size"].tolist() == [50, 100]


def test_crop_outside_the_image_is_an_error():
    with pytest.raises(ValueError, match="not inside the 100 x 200 image"):
        crop(_gradient_image(100, 200), _target([]), top=60, left=0, height=50, width=100)


def test_normalize_converts_image_and_boxes():
    image = _gradient_image(40, 80)
    tensor, target = Normalize()(image, _target([[8, 4, 40, 20]]))
    assert tensor.shape == (3, 40, 80) and tensor.dtype == torch.float32
    pixel = torch.tensor(image.getpixel((5, 3)), dtype=torch.float32) / 255
    expected = (pixel - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tensor[:, 3, 5], expected)
    # cx = 24 / 80, cy = 12 / 40, w = 32 / 80, h = 16 / 40
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.3, 0.3, 0.4, 0.4]]))
    assert target["size"].tolist() == [40, 80]


def _bright_pixels(tensor):
    """H x W bool: pixels brighter than half in a normalised image."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((tensor * std + mean).mean(0) > 0.5).numpy()


def _bright_box(tensor):
    """Pixel-edge xyxy around the bright pixels of a normalised image."""
    bright = _bright_pixels(tensor)
    rows = np.flatnonzero(bright.any(axis=1))
    cols = np.flatnonzero(bright.any(axis=0))
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)


SMALL = dict(scales=(96, 112, 128, 144, 160), max_size=213, crop_resize=(96, 128), crop_range=(64, 112), eval_size=128)


@pytest.mark.parametrize("seed", range(12))
def test_train_transforms_keep_boxes_on_the_object(seed):
    """Whatever the random flip/resize/crop, the target box is where the white rectangle ended up."""
    torch.manual_seed(seed)
    rectangle = (40, 30, 100, 70)
    image = _rectangle_image(120, 150, rectangle)
    tensor, target = make_transforms(True, **SMALL)(image, _target([rectangle], [2]))
    height, width = tensor.shape[1:]
    assert target["size"].tolist() == [height, width]
    assert max(height, width) <= SMALL["max_size"]
    if len(target["boxes"]) == 0:  # cropped away entirely: then no part of the rectangle may remain
        assert not _bright_pixels(tensor).any()
        return
    assert target["labels"].tolist() == [2]
    cx, cy, w, h = target["boxes"][0].tolist()
    box = torch.tensor([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
    # Bilinear resampling blurs edges by about a pixel.
    torch.testing.assert_close(box, _bright_box(tensor), atol=1.5, rtol=0)


def test_train_transforms_follow_the_seed():
    image = _gradient_image(120, 150)
    boxes = [[10, 10, 60, 60], [70, 20, 140, 110]]
    transforms = make_transforms(True, **SMALL)
    results = []
    for seed in (3, 3, 4, 5, 6):
        torch.manual_seed(seed)
        results.append(transforms(image, _target(boxes)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1]["boxes"], results[1][1]["boxes"])
    assert any(
        results[0][0].shape != other.shape or not torch.equal(results[0][0], other) for other, _ in results[2:]
    )


def test_eval_transforms_are_deterministic_resize_and_normalise():
    image = _gradient_image(100, 200)
    tensor, target = make_transforms(False, eval_size=50, max_size=1333)(image, _target([[10, 20, 50, 60]]))
    assert tensor.shape == (3, 50, 100)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.15, 0.4, 0.2, 0.4]]))


def test_train_transforms_without_the_crop_branch_never_crop():
    image = _gradient_image(120, 150)
    transforms = make_transforms(True, **{**SMALL, "crop_resize": None})
    for seed in range(8):
        torch.manual_seed(seed)
        tensor, target = transforms(image, _target([[0, 0, 150, 120]]))
        height, width = tensor.shape[1:]
        assert height in SMALL["scales"]  # the shorter side, aspect kept: nothing was cut away
        assert width == int(height * 150 / 120)
        torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
