"""Detection data: COCO-format datasets, DETR's transforms, batching, and the synthetic shapes dataset."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from deco.data.coco import CocoDetection, resolve_coco_paths
from deco.data.transforms import make_transforms

__all__ = ["CocoDetection", "build_dataset", "collate_fn", "make_transforms"]


def build_dataset(
    root: str | os.PathLike, split: str, *, train: bool, transforms: Callable | None = None
) -> CocoDetection:
    """The ``split`` of the COCO-format dataset under ``root``.

    Layout (first match wins): ``root/instances_{split}.json`` + ``root/images/``, or the standard COCO 2017
    ``root/annotations/instances_{split}2017.json`` + ``root/{split}2017/``. ``transforms=None`` means
    ``make_transforms(train)`` (DETR's full-size augmentation or evaluation resize); pass your own
    ``make_transforms(...)`` for other image sizes.
    """
    annotation_file, image_dir = resolve_coco_paths(root, split)
    if transforms is None:
        transforms = make_transforms(train)
    return CocoDetection(annotation_file, image_dir, transforms)


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Batch ``(image: 3 x H_i x W_i, target)`` pairs.

    Returns ``(images: B x 3 x Hmax x Wmax, zero-padded at the bottom and right; mask: B x Hmax x Wmax bool,
    True on padding; targets: list of the B targets)``.
    """
    if len(batch) == 0:
        raise ValueError("collate_fn got an empty batch")
    images = [image for image, _ in batch]
    for i, image in enumerate(images):
        if image.dim() != 3:
            raise ValueError(f"batch item {i}: expected a 3-D C x H x W image tensor, got shape {tuple(image.shape)}")
        if image.shape[0] != images[0].shape[0] or image.dtype != images[0].dtype:
            raise ValueError(
                f"batch item {i}: image has {image.shape[0]} channels of {image.dtype}, item 0 has "
                f"{images[0].shape[0]} of {images[0].dtype}"
            )
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool)
    for i, image in enumerate(images):
        padded[i, :, : image.shape[1], : image.shape[2]] = image
        mask[i, : image.shape[1], : image.shape[2]] = False
    return padded, mask, [target for _, target in batch]
