"""``deco synth``: write the synthetic shapes dataset (see :mod:`deco.data.synthetic`)."""

from __future__ import annotations

import argparse
import logging

from deco.commands.eval import exit_code_on_input_error
from deco.data.synthetic import write_synthetic_dataset

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write the synthetic shapes detection dataset",
        description="Render shapes (rectangle, ellipse, triangle) on noisy backgrounds and write them as a "
        "COCO-format dataset: DIR/instances_train.json, DIR/instances_val.json and DIR/images/*.png. "
        "The same seed gives byte-identical files.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--images", type=int, required=True, metavar="N", help="number of images in total")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"), help="image size (default 128 128)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of the images in the val split (default 0.2)"
    )
    parser.add_argument("--max-objects", type=int, default=3, help="most objects in one image (default 3)")
    parser.add_argument(
        "--empty-fraction", type=float, default=0.1, help="probability of an image without objects (default 0.1)"
    )
    parser.set_defaults(func=run)


@exit_code_on_input_error
def run(args: argparse.Namespace) -> int:
    summary = write_synthetic_dataset(
        args.out,
        args.images,
        args.seed,
        tuple(args.size),
        val_fraction=args.val_fraction,
        max_objects=args.max_objects,
        empty_fraction=args.empty_fraction,
    )
    for split, counts in summary.items():
        logger.info(
            "%s: %d images, %d objects -> %s", split, counts["images"], counts["objects"], counts["annotation_file"]
        )
    return 0
