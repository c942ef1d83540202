"""``deco demo``: the whole pipeline in minutes — synthetic data, training a small DECO from scratch on the best
device present, COCO evaluation on the val split — ending with AP and AP50."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# Fraction of the time budget kept back for the final evaluation on the val split (plus a fixed margin).
EVAL_RESERVE_FRACTION = 0.04
EVAL_RESERVE_SECONDS = 10.0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train and evaluate a small DECO on a synthetic shapes dataset within a time budget",
        description="Create the synthetic dataset (if missing) in OUT/data, train the demo preset "
        "(see deco.config.demo_config) for about MINUTES minutes in total, evaluate on the val split and "
        "print AP / AP50. Uses CUDA with the fused kernels when a GPU is present, else the CPU with stock layers.",
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (data/, run/, demo_result.json)")
    parser.add_argument("--minutes", type=float, default=13.5, help="wall-time budget for everything (data, training, evaluation)")
    parser.add_argument("--num-images", type=int, default=1200, help="synthetic images to create (20%% val)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square synthetic images")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", choices=["none", "bf16"], default=None,
                        help="bf16 autocast (default: bf16 on CUDA, none on the CPU)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from deco.config import demo_config
    from deco.data.synthetic import write_synthetic_dataset
    from deco.engine import Trainer, resolve_device

    if args.minutes <= 0:
        raise SystemExit(f"deco demo: --minutes must be positive; got {args.minutes}")
    started = time.perf_counter()
    out = Path(args.out)
    data = out / "data"
    if (data / "instances_train.json").is_file() and (data / "instances_val.json").is_file():
        logger.info("using the synthetic dataset in %s", data)
    else:
        logger.info("writing %d synthetic images to %s", args.num_images, data)
        write_synthetic_dataset(data, args.num_images, args.seed, image_size=(args.image_size, args.image_size))

    device = resolve_device(args.device)
    on_gpu = torch.device(device).type == "cuda"
    kernels = "fused" if on_gpu else "stock"
    amp = args.amp if args.amp is not None else ("bf16" if on_gpu else "none")
    logger.info(
        "demo on %s with kernels=%s, amp=%s%s", device, kernels, amp,
        "" if on_gpu else " (no GPU present: stock PyTorch layers on the CPU)",
    )
    budget = 60 * args.minutes - (time.perf_counter() - started)
    train_minutes = (budget * (1 - EVAL_RESERVE_FRACTION) - EVAL_RESERVE_SECONDS) / 60
    if train_minutes <= 0:
        raise SystemExit(f"deco demo: --minutes {args.minutes} leaves no time to train after creating the data")
    config = demo_config().replace(
        data=str(data), out=str(out / "run"), device=device, kernels=kernels, amp=amp, seed=args.seed,
        max_minutes=train_minutes,
    )
    trainer = Trainer(config)
    trainer.fit()
    metrics = trainer.evaluate()
    wall = time.perf_counter() - started
    result = {
        "AP": metrics["AP"],
        "AP50": metrics["AP50"],
        "metrics": metrics,
        "steps": trainer.step,
        "epochs": trainer.epoch + trainer.epoch_step / trainer.steps_per_epoch,
        "wall_seconds": wall,
        "device": str(trainer.device),
        "kernels": kernels,
        "checkpoint": str(out / "run" / "last.pt"),
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"DECO demo: AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  after {trainer.step} steps "
        f"({result['epochs']:.1f} epochs) in {wall / 60:.1f} min on {trainer.device} (kernels={kernels})"
    )
    return 0
