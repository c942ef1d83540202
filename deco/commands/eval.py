"""``deco eval``: COCO box metrics of a checkpoint on a COCO-format dataset, optionally under torchrun."""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from deco.data import build_dataset, collate_fn, make_transforms
from deco.data.files import write_json_atomically
from deco.distributed import cleanup, init_distributed, is_distributed, is_main_process
from deco.engine import resolve_device
from deco.evaluation import CocoEvaluator, build_model_from_checkpoint, evaluate, format_metrics, load_model_checkpoint

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="COCO box metrics (AP, AP50, ..., ARl) of a checkpoint",
        description="Evaluate a checkpoint on a COCO-format dataset (layout: see deco.data.build_dataset), print "
        "the 12 COCO metrics and optionally write them as JSON. Runs data-parallel under torchrun.",
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset root")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint of deco train / convert")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch and process (default 2)")
    parser.add_argument("--num-workers", type=int, default=2, help="data loader workers per process (default 2)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda (default auto)")
    add_model_arguments(parser)
    parser.add_argument("--out", metavar="metrics.json", help="write the metrics here as JSON")
    parser.set_defaults(func=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--kernels``, ``--channels-last``, ``--eval-size`` and ``--max-size``, shared with ``deco predict``."""
    parser.add_argument(
        "--kernels",
        choices=("stock", "fused"),
        help="layer implementation: plain PyTorch or deco_kernels (default: the checkpoint's; the weights are "
        "the same either way)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="run the model on channels-last (NHWC) tensors (default: as the checkpoint was trained)",
    )
    parser.add_argument(
        "--eval-size",
        type=int,
        help="shorter image side fed to the model (default: the checkpoint's training config, else 800)",
    )
    parser.add_argument(
        "--max-size", type=int, help="longest image side (default: the checkpoint's training config, else 1333)"
    )


def eval_transforms(args: argparse.Namespace, checkpoint: dict):
    """Evaluation resize: command-line values, else the sizes the checkpoint was trained for (its "config"),
    else DETR's 800 / 1333."""
    config = checkpoint.get("config") or {}
    eval_size = args.eval_size or config.get("eval_size", 800)
    max_size = args.max_size or config.get("max_size", 1333)
    logger.info("evaluation resize: shorter side %d, longer side <= %d", eval_size, max_size)
    return make_transforms(False, eval_size=eval_size, max_size=max_size)


def exit_code_on_input_error(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command's ``run``: a missing or invalid input (FileNotFoundError / ValueError, whose messages name
    the file and the problem) is logged as one line and gives exit code 1 instead of a traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (FileNotFoundError, ValueError) as error:
            logger.error("deco %s: %s", args.command, error)
            return 1

    return run


def load_model(args: argparse.Namespace, checkpoint: dict, device: torch.device) -> torch.nn.Module:
    overrides = {"kernels": args.kernels} if args.kernels else {}
    return build_model_from_checkpoint(checkpoint, device, channels_last=args.channels_last, **overrides)


def _check_categories(model_categories: list[dict], dataset_categories: list[dict]) -> None:
    model_pairs = [(c["id"], c["name"]) for c in model_categories]
    dataset_pairs = [(c["id"], c["name"]) for c in dataset_categories]
    if model_pairs != dataset_pairs:
        logger.warning(
            "the checkpoint's %d categories differ from the dataset's %d; detections are scored by the "
            "checkpoint's category ids",
            len(model_pairs),
            len(dataset_pairs),
        )


@exit_code_on_input_error
def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.num_workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --num-workers >= 0; got {args.batch_size}, {args.num_workers}")
    device = init_distributed(resolve_device(args.device))
    try:
        checkpoint = load_model_checkpoint(args.checkpoint)
        dataset = build_dataset(args.data, args.split, train=False, transforms=eval_transforms(args, checkpoint))
        _check_categories(checkpoint["categories"], dataset.categories)
        model = load_model(args, checkpoint, device)
        sampler = DistributedSampler(dataset, shuffle=False) if is_distributed() else SequentialSampler(dataset)
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
        )
        evaluator = CocoEvaluator(dataset.coco, checkpoint["categories"])
        metrics = evaluate(model, loader, evaluator, device, log_table=False)  # printed below instead
        if is_main_process():
            print(format_metrics(metrics))
            if args.out:
                write_json_atomically(args.out, metrics)
                logger.info("metrics written to %s", args.out)
    finally:
        cleanup()
    return 0
