"""DETR's data augmentation and evaluation resize, as functions on ``(PIL image, target)`` pairs.

Until :class:`Normalize` (the last step) a target holds ``"boxes"``: N x 4 float32 **xyxy in absolute pixels**
of the current image and ``"labels"``: N int64, plus ``"size"``: int64 (h, w) of the current image; every
geometric step updates all three. :class:`Normalize` turns the image into a 3 x H x W float32 tensor with
ImageNet statistics and the boxes into cxcywh normalised by the transformed image size, the format the model
and the loss use.

Randomness comes from torch's global generator (``torch.manual_seed`` fixes it; DataLoader workers get their
own seeds from it), never from Python's ``random``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from deco.box_ops import box_xyxy_to_cxcywh

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "Resize",
    "crop",
    "hflip",
    "make_transforms",
    "resize",
    "resized_shape",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Target = dict
Transform = Callable[[Image.Image, Target], tuple[Image.Image, Target]]


def _image_hw(image: Image.Image) -> tuple[int, int]:
    return image.height, image.width


def _with_size(target: Target, height: int, width: int) -> Target:
    target = dict(target)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return target


def hflip(image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
    """Mirror left-right; box (x0, y0, x1, y1) becomes (W - x1, y0, W - x0, y1)."""
    height, width = _image_hw(image)
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    target = _with_size(target, height, width)
    boxes = target["boxes"]
    target["boxes"] = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
    return flipped, target


def resized_shape(height: int, width: int, shorter_side: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) after scaling the shorter side to ``shorter_side``, aspect kept, the longer side <= ``max_size``.

    When the longer side would exceed ``max_size`` the shorter side is reduced instead (DETR's rule), so the
    longer side ends at ``max_size`` up to rounding.
    """
    if shorter_side <= 0:
        raise ValueError(f"shorter_side must be positive; got {shorter_side}")
    short, long = min(height, width), max(height, width)
    if max_size is not None and long * shorter_side > max_size * short:
        shorter_side = max(1, int(round(max_size * short / long)))
    if short == shorter_side:
        return height, width
    if width < height:
        return int(shorter_side * height / width), shorter_side
    return shorter_side, int(shorter_side * width / height)


def resize(
    image: Image.Image, target: Target, shorter_side: int, max_size: int | None = None
) -> tuple[Image.Image, Target]:
    """Resize (bilinear) per :func:`resized_shape`; boxes scale by (new_w / w, new_h / h)."""
    height, width = _image_hw(image)
    new_height, new_width = resized_shape(height, width, shorter_side, max_size)
    resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    target = _with_size(target, new_height, new_width)
    scale = torch.tensor(
        [new_width / width, new_height / height, new_width / width, new_height / height], dtype=torch.float32
    )
    target["boxes"] = target["boxes"] * scale
    return resized, target


def crop(
    image: Image.Image, target: Target, top: int, left: int, height: int, width: int
) -> tuple[Image.Image, Target]:
    """Cut the ``height x width`` region at (top, left); boxes shift and clip to it.

    A box left with zero width or height (entirely outside the region, or touching it only on an edge) is
    removed together with its label, as DETR does.
    """
    img_height, img_width = _image_hw(image)
    inside = 0 <= top and 0 <= left and top + height <= img_height and left + width <= img_width
    if not (inside and height > 0 and width > 0):
        raise ValueError(
            f"crop region (top={top}, left={left}, height={height}, width={width}) is not inside the "
            f"{img_height} x {img_width} image"
        )
    cropped = image.crop((left, top, left + width, top + height))
    target = _with_size(target, height, width)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    limits = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target["boxes"] = boxes[keep]
    target["labels"] = target["labels"][keep]
    return cropped, target


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (both ends included) from torch's global generator."""
    return int(torch.randint(low, high + 1, ()).item())


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: Image.Image, target: Target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms!r})"


class RandomHorizontalFlip:
    """:func:`hflip` with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomResize:
    """:func:`resize` with the shorter side drawn uniformly from ``sizes``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if len(sizes) == 0:
            raise ValueError("sizes must hold at least one shorter-side length")
        self.sizes = tuple(int(s) for s in sizes)
        self.max_size = max_size

    def __call__(self, image, target):
        size = self.sizes[_randint(0, len(self.sizes) - 1)]
        return resize(image, target, size, self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size})"


class Resize:
    """Deterministic :func:`resize` (the evaluation transform)."""

    def __init__(self, shorter_side: int, max_size: int | None = None):
        self.shorter_side = shorter_side
        self.max_size = max_size

    def __call__(self, image, target):
        return resize(image, target, self.shorter_side, self.max_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shorter_side={self.shorter_side}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a region whose width and height are drawn uniformly from [min_size, max_size] (each clipped to the
    image), at a uniformly random position."""

    def __init__(self, min_size: int, max_size: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"crop range must satisfy 0 < min_size <= max_size; got ({min_size}, {max_size})")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target):
        img_height, img_width = _image_hw(image)
        width = _randint(min(self.min_size, img_width), min(img_width, self.max_size))
        height = _randint(min(self.min_size, img_height), min(img_height, self.max_size))
        top = _randint(0, img_height - height)
        left = _randint(0, img_width - width)
        return crop(image, target, top, left, height, width)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability ``p``, else ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5):
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, image, target):
        if torch.rand(()).item() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.first!r}, {self.second!r}, p={self.p})"


class Normalize:
    """PIL image -> 3 x H x W float32 tensor normalised with ImageNet statistics; boxes xyxy absolute ->
    cxcywh normalised to [0, 1] by the image size."""

    def __call__(self, image, target):
        height, width = _image_hw(image)
        tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        target = _with_size(target, height, width)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        return tensor, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def make_transforms(
    train: bool,
    *,
    scales: Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    crop_resize: Sequence[int] | None = (400, 500, 600),
    crop_range: tuple[int, int] = (384, 600),
    eval_size: int = 800,
) -> Compose:
    """DETR's transforms.

    train: horizontal flip (p 0.5), then with p 0.5 a random shorter-side resize to one of ``scales`` (longer
    side <= ``max_size``), else a resize to one of ``crop_resize`` -> a random crop with sides in
    ``crop_range`` -> the same random resize; then :class:`Normalize`.
    eval: shorter side ``eval_size``, longer side <= ``max_size``; then :class:`Normalize`.
    ``crop_resize=None`` (or empty) leaves out the crop branch: flip, then the multi-scale resize.
    Small-image set-ups (the synthetic demo) scale every parameter down, e.g. scales 96..160, max_size 213.
    """
    normalize = Normalize()
    if not train:
        return Compose([Resize(eval_size, max_size), normalize])
    multi_scale = RandomResize(scales, max_size=max_size)
    if not crop_resize:
        return Compose([RandomHorizontalFlip(), multi_scale, normalize])
    return Compose(
        [
            RandomHorizontalFlip(),
            RandomSelect(
                multi_scale,
                Compose([RandomResize(crop_resize), RandomSizeCrop(*crop_range), multi_scale]),
            ),
            normalize,
        ]
    )
