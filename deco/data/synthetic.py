"""A synthetic, learnable detection dataset of rendered shapes, written in COCO format.

Three classes told apart by shape (rectangle, ellipse, triangle), each with a colour tendency (reddish,
greenish, bluish hues, but one object in seven takes any hue so that shape has to be learned), at varied
sizes (0.3 to 0.65 of the shorter image side, so a stride-32 model on 128-160 px images sees
them) and aspect ratios, overlapping (at most 40 % of the smaller box) but never hidden by more than 30 %, on
noisy backgrounds with a colour gradient and a low-frequency texture. About one image in ten has no object.

Output (loaded by :func:`deco.data.build_dataset` like any COCO-format folder)::

    out_dir/instances_train.json
    out_dir/instances_val.json
    out_dir/images/000001.png ...

Every image is drawn from its own generator seeded by ``(seed, image id)``, so the same seed gives
byte-identical files (PNG through the same Pillow/zlib); JSON files are written atomically.
"""

from __future__ import annotations

import colorsys
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from deco.data.files import write_bytes_atomically, write_json_atomically

__all__ = ["CATEGORIES", "write_synthetic_dataset"]

CATEGORIES = (
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
)
_CLASS_HUE = {1: 0.0, 2: 0.33, 3: 0.62}
_HUE_JITTER = 0.07
_FREE_HUE_PROBABILITY = 0.15
_OBJECT_SIDE_RANGE = (0.3, 0.65)  # fraction of the shorter image side
_MIN_VISIBLE_FRACTION = 0.7
# Intersection of two objects' boxes over the smaller one's area: caps IoU and keeps a small object from
# sitting inside a large one's box, so that every box stays tellable from the others.
_MAX_BOX_OVERLAP = 0.4
_PLACEMENT_ATTEMPTS = 30
_MIN_COLOUR_CONTRAST = 70.0  # Euclidean RGB distance between an object and the background under it


@dataclass
class _Object:
    category_id: int
    mask: np.ndarray  # H x W bool, the whole shape
    colour: np.ndarray  # 3 float


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """H x W x 3 float: base colour + linear gradient + low-frequency sine texture (noise comes later)."""
    base = rng.uniform(40, 215, size=3)
    ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xs + np.sin(angle) * ys
    gradient = ramp[..., None] * rng.uniform(-40, 40, size=3)
    frequency = rng.uniform(1.5, 6.0, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    texture = np.sin(np.pi * frequency[0] * xs + phase[0]) * np.sin(np.pi * frequency[1] * ys + phase[1])
    texture = texture[..., None] * rng.uniform(-20, 20, size=3)
    return base + gradient + texture


def _shape_mask(rng: np.random.Generator, category_id: int, height: int, width: int) -> np.ndarray:
    """H x W bool mask of one randomly sized and placed shape of ``category_id``."""
    shorter = min(height, width)
    box_w = int(rng.uniform(*_OBJECT_SIDE_RANGE) * shorter)
    box_h = int(rng.uniform(*_OBJECT_SIDE_RANGE) * shorter)
    x0 = int(rng.integers(0, width - box_w + 1))
    y0 = int(rng.integers(0, height - box_h + 1))
    # PIL's rectangle/ellipse bounds are inclusive: the last pixel column drawn is x0 + box_w - 1.
    x1, y1 = x0 + box_w - 1, y0 + box_h - 1
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if category_id == 1:
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif category_id == 2:
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:
        apex_x = x0 + rng.uniform(0, 1) * (x1 - x0)
        if rng.uniform() < 0.5:  # apex up or down
            vertices = [(apex_x, y0), (x0, y1), (x1, y1)]
        else:
            vertices = [(apex_x, y1), (x0, y0), (x1, y0)]
        draw.polygon(vertices, fill=255)
    return np.asarray(canvas) > 0


def _object_colour(rng: np.random.Generator, category_id: int) -> np.ndarray:
    if rng.uniform() < _FREE_HUE_PROBABILITY:
        hue = rng.uniform()
    else:
        hue = (_CLASS_HUE[category_id] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
    saturation = rng.uniform(0.55, 1.0)
    value = rng.uniform(0.55, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255


def _box_of(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of the pixels in ``mask``, in pixel-edge coordinates."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] + 1 - cols[0]), int(rows[-1] + 1 - rows[0])]


def _box_overlap(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Intersection of the two masks' boxes over the smaller box's area."""
    xa, ya, wa, ha = _box_of(mask_a)
    xb, yb, wb, hb = _box_of(mask_b)
    overlap_w = max(0, min(xa + wa, xb + wb) - max(xa, xb))
    overlap_h = max(0, min(ya + ha, yb + hb) - max(ya, yb))
    intersection = overlap_w * overlap_h
    return intersection / min(wa * ha, wb * hb)


def _visible_masks(objects: list[_Object]) -> list[np.ndarray]:
    """Visible part of each object's mask when drawn in order (later objects on top)."""
    covered = np.zeros_like(objects[0].mask)
    visible = []
    for obj in reversed(objects):
        visible.append(obj.mask & ~covered)
        covered = covered | obj.mask
    return visible[::-1]


def _draw_objects(rng: np.random.Generator, pixels: np.ndarray, count: int) -> list[_Object]:
    """Draw up to ``count`` objects into ``pixels`` (H x W x 3 float, in place), each left at least
    :data:`_MIN_VISIBLE_FRACTION` visible, contrasting with what it covers and overlapping no other box by
    more than :data:`_MAX_BOX_OVERLAP`; a placement that breaks a rule is redrawn (a few times, then that
    object is dropped)."""
    height, width = pixels.shape[:2]
    objects: list[_Object] = []
    for _ in range(count):
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            mask = _shape_mask(rng, category_id, height, width)
            colour = _object_colour(rng, category_id)
            if np.linalg.norm(pixels[mask].mean(axis=0) - colour) < _MIN_COLOUR_CONTRAST:
                continue
            if any(_box_overlap(mask, other.mask) > _MAX_BOX_OVERLAP for other in objects):
                continue
            candidate = [*objects, _Object(category_id, mask, colour)]
            visible = _visible_masks(candidate)
            if all(v.sum() >= _MIN_VISIBLE_FRACTION * o.mask.sum() for v, o in zip(visible, candidate)):
                objects = candidate
                pixels[mask] = colour
                break
    return objects


def _render(rng: np.random.Generator, height: int, width: int, count: int) -> tuple[np.ndarray, list[_Object]]:
    """H x W x 3 uint8 image and its objects."""
    pixels = _background(rng, height, width)
    objects = _draw_objects(rng, pixels, count)
    pixels = pixels + rng.normal(0.0, rng.uniform(3, 10), size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), objects


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int,
    image_size: tuple[int, int] = (128, 128),
    *,
    val_fraction: float = 0.2,
    max_objects: int = 3,
    empty_fraction: float = 0.1,
    progress: bool = True,
) -> dict:
    """Render ``num_images`` images (``image_size`` = (height, width)) and write them with COCO annotations.

    A shuffled ``val_fraction`` of the images (at least one when ``num_images >= 2`` and the fraction is
    positive; the train split keeps at least one) forms ``instances_val.json``, the rest
    ``instances_train.json``. Each image holds no object with probability ``empty_fraction``, else 1 to
    ``max_objects``. Boxes are the tight pixel extent of each whole shape. Returns a summary: the two
    annotation paths and the image and object counts per split.
    """
    height, width = (int(v) for v in image_size)
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1; got {num_images}")
    if height < 32 or width < 32:
        raise ValueError(f"image_size must be at least 32 x 32 pixels; got {height} x {width}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1]; got {empty_fraction}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1; got {max_objects}")

    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    num_val = int(round(num_images * val_fraction))
    if num_images >= 2 and val_fraction > 0:
        num_val = min(max(num_val, 1), num_images - 1)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(num_images) + 1
    val_ids = set(order[:num_val].tolist())

    splits = {name: {"images": [], "annotations": []} for name in ("train", "val")}
    next_annotation_id = 1
    for image_id in tqdm(range(1, num_images + 1), desc="synthetic images", unit="img", disable=not progress):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, image_id]))
        count = 0 if rng.uniform() < empty_fraction else int(rng.integers(1, max_objects + 1))
        pixels, objects = _render(rng, height, width, count)
        file_name = f"{image_id:06d}.png"
        png = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(png, format="PNG")
        write_bytes_atomically(image_dir / file_name, png.getvalue())
        split = splits["val" if image_id in val_ids else "train"]
        split["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            split["annotations"].append(
                {
                    "id": next_annotation_id,
                    "image_id": image_id,
                    "category_id": obj.category_id,
                    "bbox": _box_of(obj.mask),
                    "area": int(obj.mask.sum()),
                    "iscrowd": 0,
                }
            )
            next_annotation_id += 1

    summary = {}
    for name, split in splits.items():
        path = out_dir / f"instances_{name}.json"
        document = {
            "info": {"description": "deco synthetic shapes", "seed": seed, "split": name},
            "images": split["images"],
            "annotations": split["annotations"],
            "categories": [dict(c) for c in CATEGORIES],
        }
        write_json_atomically(path, document)
        summary[name] = {
            "annotation_file": str(path),
            "images": len(split["images"]),
            "objects": len(split["annotations"]),
        }
    return summary
