"""``deco convert SRC DST``: turn a released DECO checkpoint into one this project's model loads."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a released DECO checkpoint to this project's layout",
        description="Read SRC (a checkpoint of the authors' release, state dict under 'model': DECO with a "
        "ResNet-18, ResNet-50 or ConvNeXt-T backbone, told apart by its backbone keys), map its keys to "
        "deco.models.build_deco's layout, check every key and shape, and write DST atomically as "
        "{'model': state_dict, 'model_config': build_deco keyword arguments, 'categories': [...]}, "
        "the checkpoint format that deco eval and deco predict read.",
    )
    parser.add_argument("src", metavar="SRC", help="released checkpoint (.pth)")
    parser.add_argument("dst", metavar="DST", help="converted checkpoint to write")
    parser.add_argument(
        "--query-grid", type=int, nargs=2, metavar=("ROWS", "COLUMNS"), default=None,
        help="query grid of the released model (default: rows of 10, as the release's qH = 10)",
    )
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="allow arbitrary pickled objects in SRC (only for files from a trusted source)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deco.models import convert_official_checkpoint

    try:
        config = convert_official_checkpoint(
            args.src, args.dst, query_grid=tuple(args.query_grid) if args.query_grid else None,
            trust_pickle=args.trust_pickle,
        )
    except (FileNotFoundError, ValueError) as error:
        logger.error("deco convert: %s", error)
        return 1
    logger.info("wrote %s (%s)", args.dst, ", ".join(f"{key}={value}" for key, value in config.items()))
    return 0
