"""The ``deco`` command line: one sub-command per module in :mod:`deco.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module defines ``add_parser(subparsers)`` (which sets ``func`` on its parser) and the code it runs.
COMMANDS = ("train", "demo", "convert", "synth", "eval", "predict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deco", description="Train, evaluate and run DECO detectors.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"deco.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
