"""``deco predict``: detect objects in image files and write them drawn, plus a JSON of the detections."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from deco.commands.eval import add_model_arguments, eval_transforms, exit_code_on_input_error, load_model
from deco.data import collate_fn
from deco.data.coco import load_image
from deco.data.files import write_json_atomically
from deco.engine import resolve_device
from deco.evaluation import MAX_DETECTIONS, load_model_checkpoint
from deco.models import postprocess

logger = logging.getLogger(__name__)

# Distinct, saturated colours; category label i uses entry i mod len.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40), (255, 225, 25),
)  # fmt: skip


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="detect objects in images and draw them",
        description="Run a checkpoint on image files; write each image with its detections drawn (box, "
        "category name, score) to DIR as PNG, and all detections to DIR/detections.json.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint of deco train / convert")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score of a detection (default 0.5)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda (default auto)")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def draw_detections(image: Image.Image, detections: Sequence[dict]) -> Image.Image:
    """A copy of ``image`` (RGB) with each detection's box outlined and "name score" written above it.

    detections: dicts with "box" (x0, y0, x1, y1 in pixels), "label" (int, picks the colour), "name", "score".
    """
    drawn = image.convert("RGB")  # convert always copies
    draw = ImageDraw.Draw(drawn)
    font = ImageFont.load_default()
    line_width = max(1, round(min(drawn.size) / 200))
    # Drawn in reverse so that the first (best, for detect()'s output) ends on top of the others.
    for detection in reversed(detections):
        x0, y0, x1, y1 = detection["box"]
        colour = PALETTE[detection["label"] % len(PALETTE)]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line_width)
        caption = f"{detection['name']} {detection['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_height = bottom - top
        # Above the box when there is room, else just inside its top edge.
        text_y = y0 - text_height - 2 if y0 - text_height - 2 >= 0 else y0
        draw.rectangle((x0, text_y, x0 + right - left + 3, text_y + text_height + 2), fill=colour)
        draw.text((x0 + 2 - left, text_y + 1 - top), caption, fill=(255, 255, 255), font=font)
    return drawn


@torch.no_grad()
def detect(
    model: torch.nn.Module,
    image: Image.Image,
    transforms,
    categories: list[dict],
    device: torch.device,
    threshold: float,
) -> list[dict]:
    """Detections in one RGB image with score >= ``threshold``, best first: dicts with "label", "category_id",
    "name", "score" and "box" (x0, y0, x1, y1 in pixels of ``image``)."""
    empty_target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    tensor, _ = transforms(image, empty_target)
    images, mask, _ = collate_fn([(tensor, {})])
    outputs = model(images.to(device), mask.to(device))
    size = torch.tensor([[image.height, image.width]], device=device)
    top_k = min(MAX_DETECTIONS, outputs["pred_logits"][0].numel())
    result = postprocess(outputs, size, top_k=top_k)[0]
    detections = []
    for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()):
        if score < threshold:
            break  # sorted by decreasing score
        if label >= len(categories):
            raise ValueError(f"the model predicts label {label} but the checkpoint names {len(categories)} categories")
        detections.append(
            {
                "label": label,
                "category_id": categories[label]["id"],
                "name": categories[label]["name"],
                "score": score,
                "box": box,
            }
        )
    return detections


def _output_names(paths: Sequence[Path]) -> list[str]:
    """One PNG name per input, from its stem; repeated stems get a numeric suffix."""
    names, seen = [], {}
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(f"{path.stem}.png" if count == 0 else f"{path.stem}_{count}.png")
    return names


@exit_code_on_input_error
def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1]; got {args.threshold}")
    device = torch.device(resolve_device(args.device))
    checkpoint = load_model_checkpoint(args.checkpoint)
    transforms = eval_transforms(args, checkpoint)
    model = load_model(args, checkpoint, device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in args.images]
    report = []
    for path, name in zip(paths, _output_names(paths)):
        image = load_image(path)
        detections = detect(model, image, transforms, checkpoint["categories"], device, args.threshold)
        draw_detections(image, detections).save(out_dir / name)
        logger.info("%s: %d detections -> %s", path, len(detections), out_dir / name)
        report.append(
            {
                "image": str(path),
                "output": str(out_dir / name),
                "height": image.height,
                "width": image.width,
                "detections": detections,
            }
        )
    write_json_atomically(out_dir / "detections.json", report)
    return 0
