"""COCO-format detection datasets read through pycocotools, with the annotation file checked up front.

Every problem is an error naming the file and what is wrong (missing or corrupt JSON, an annotation whose
category or image is unknown, a box without exactly four finite numbers, an image that cannot be decoded);
nothing is skipped silently. Crowd annotations stay in :attr:`CocoDetection.coco` (COCOeval uses them to
ignore detections) but are left out of the training targets, as in DETR.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["CocoDetection", "load_coco_json", "load_image", "resolve_coco_paths"]


def load_coco_json(path: str | os.PathLike) -> dict:
    """Read and check a COCO annotation file; returns the parsed dict.

    Raises FileNotFoundError (missing file) or ValueError naming ``path`` and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file {path} is not valid JSON: {error}") from error
    _check_coco_dict(data, path)
    return data


def _check_coco_dict(data: object, path: Path) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotation file {path}: expected a list under {key!r}")

    category_ids = set()
    for category in data["categories"]:
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or "name" not in category:
            raise ValueError(f"annotation file {path}: category {category!r} needs an integer 'id' and a 'name'")
        if category["id"] in category_ids:
            raise ValueError(f"annotation file {path}: category id {category['id']} appears twice")
        category_ids.add(category["id"])

    image_ids = set()
    for image in data["images"]:
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or "file_name" not in image:
            raise ValueError(f"annotation file {path}: image {image!r} needs an integer 'id' and a 'file_name'")
        if image["id"] in image_ids:
            raise ValueError(f"annotation file {path}: image id {image['id']} appears twice")
        image_ids.add(image["id"])

    for annotation in data["annotations"]:
        if not isinstance(annotation, dict):
            raise ValueError(f"annotation file {path}: annotation {annotation!r} is not an object")
        name = f"annotation {annotation.get('id', '(no id)')}"
        if annotation.get("category_id") not in category_ids:
            raise ValueError(
                f"annotation file {path}: {name} has category_id {annotation.get('category_id')!r}, which is not "
                f"among the file's categories {sorted(category_ids)}"
            )
        if annotation.get("image_id") not in image_ids:
            raise ValueError(
                f"annotation file {path}: {name} refers to unknown image_id {annotation.get('image_id')!r}"
            )
        bbox = annotation.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        ):
            raise ValueError(
                f"annotation file {path}: {name} has bbox {bbox!r}; expected 4 finite numbers [x, y, width, height]"
            )


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and decode an image as RGB; raises FileNotFoundError / ValueError naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image file {path} cannot be decoded: {error}") from error


def resolve_coco_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) for ``split`` under ``root``.

    Rule: ``root/instances_{split}.json`` with images in ``root/images/`` (the layout ``deco synth`` writes)
    if that file exists; otherwise the standard COCO 2017 layout ``root/annotations/instances_{split}2017.json``
    with images in ``root/{split}2017/``. Raises FileNotFoundError naming both candidates when neither exists.
    """
    root = Path(root)
    flat = (root / f"instances_{split}.json", root / "images")
    coco2017 = (root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017")
    for annotation_file, image_dir in (flat, coco2017):
        if annotation_file.is_file():
            if not image_dir.is_dir():
                raise FileNotFoundError(f"image folder {image_dir} (for {annotation_file}) does not exist")
            return annotation_file, image_dir
    raise FileNotFoundError(
        f"no annotation file for split {split!r} under {root}: looked for {flat[0]} and {coco2017[0]}"
    )


class CocoDetection(Dataset):
    """A COCO-format detection dataset.

    Item ``i``: ``(image, target)`` after ``transforms`` (see :mod:`deco.data.transforms`; the DETR transforms
    give a 3 x H x W float32 normalised image and target {"boxes": N x 4 float32 cxcywh in [0, 1], "labels": N
    int64, "image_id": int, "orig_size": int64 (h, w), "size": int64 (h, w)}). Before the transforms the boxes
    are xyxy in pixels, clipped to the image, with degenerate ones (width or height <= 0) removed.

    Labels are contiguous: label ``i`` is category ``categories[i]``, categories sorted by id.
    Images are taken in ascending id order.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        transforms: Callable | None = None,
    ):
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        data = load_coco_json(self.annotation_file)
        # Imported here so that the transforms and the synthetic writer import on machines without pycocotools.
        from pycocotools.coco import COCO

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools announces its indexing on stdout
            self.coco.createIndex()
        self.categories = [
            {"id": c["id"], "name": c["name"]} for c in sorted(data["categories"], key=lambda c: c["id"])
        ]
        self.category_id_to_label = {c["id"]: label for label, c in enumerate(self.categories)}
        self.image_ids = sorted(self.coco.imgs)

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_target(self, index: int, height: int, width: int) -> dict:
        """The untransformed target of item ``index`` for an image of ``height x width`` pixels."""
        image_id = self.image_ids[index]
        annotations = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        labels = torch.tensor([self.category_id_to_label[a["category_id"]] for a in annotations], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        size = torch.tensor([height, width], dtype=torch.int64)
        return {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": image_id,
            "orig_size": size,
            "size": size.clone(),
        }

    def __getitem__(self, index: int):
        info = self.coco.imgs[self.image_ids[index]]
        path = self.image_dir / info["file_name"]
        image = load_image(path)
        expected = (info.get("height"), info.get("width"))
        if None not in expected and expected != (image.height, image.width):
            raise ValueError(
                f"image file {path} is {image.height} x {image.width} pixels but {self.annotation_file} "
                f"says {expected[0]} x {expected[1]}"
            )
        target = self.load_target(index, image.height, image.width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.annotation_file}, {len(self)} images, "
            f"{len(self.categories)} categories)"
        )
