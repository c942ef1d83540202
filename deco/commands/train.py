"""``deco train``: train DECO on a COCO-format dataset, plainly or under ``torchrun --nproc_per_node N``."""

from __future__ import annotations

import argparse
import logging

from deco.config import PRESETS, TrainConfig, preset
from deco.models.backbone import BACKBONES

logger = logging.getLogger(__name__)

# CLI option -> TrainConfig field, for the options that map one to one (None = not given on the command line).
OVERRIDES = {
    "data": "data",
    "out": "out",
    "backbone": "backbone",
    "backbone_weights": "backbone_weights",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "lr_backbone": "lr_backbone",
    "lr_encoder": "lr_encoder",
    "weight_decay": "weight_decay",
    "lr_drop": "lr_drop_epochs",
    "clip_max_norm": "clip_max_norm",
    "amp": "amp",
    "kernels": "kernels",
    "channels_last": "channels_last",
    "device": "device",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "num_workers": "num_workers",
    "seed": "seed",
    "max_steps": "max_steps",
    "max_minutes": "max_minutes",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train DECO on a COCO-format dataset",
        description="Train DECO. Options not given keep the preset's value (or, with --resume, the checkpoint's).",
    )
    parser.add_argument("--data", help="dataset root (instances_{train,val}.json + images/, or COCO 2017 layout)")
    parser.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, config.json)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="coco",
                        help="starting configuration: the COCO recipe, or the small synthetic-data demo model")
    parser.add_argument("--config", help="a TrainConfig JSON file (e.g. a run's config.json) instead of --preset")
    parser.add_argument("--backbone", choices=BACKBONES)
    parser.add_argument("--backbone-weights",
                        help="local file with ImageNet backbone weights: torchvision ResNet, timm ConvNeXt-T or "
                        "facebookresearch/ConvNeXt's convnext_tiny_*.pth (nothing downloads)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="images per process")
    parser.add_argument("--lr", type=float, help="lr of decoder, heads and input projection")
    parser.add_argument("--lr-backbone", type=float)
    parser.add_argument("--lr-encoder", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--lr-drop", type=int, nargs="*", help="epochs at which the lr is multiplied by 0.1")
    parser.add_argument("--clip-max-norm", type=float, help="gradient-norm clip (0: none)")
    parser.add_argument("--amp", choices=["none", "bf16"], help="bf16 autocast")
    parser.add_argument("--kernels", choices=["auto", "fused", "stock"],
                        help="fused Triton/CUDA kernels or stock PyTorch layers (auto: fused on CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                        help="run the model on channels-last (NHWC) tensors (default: off, or the resumed run's)")
    parser.add_argument("--resume", help="checkpoint to continue exactly (its config is the starting point)")
    parser.add_argument("--device", help="auto (default), cpu, cuda; under torchrun cuda means cuda:LOCAL_RANK")
    parser.add_argument("--eval-every", type=int, help="evaluate every N epochs (0: never)")
    parser.add_argument("--checkpoint-every", type=int, help="also checkpoint every N optimizer steps (0: epoch ends)")
    parser.add_argument("--num-workers", type=int, help="data loader workers per process")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    parser.add_argument("--max-minutes", type=float, help="stop after this many minutes of training")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset (or the resumed checkpoint's config) with every option given on the command line applied."""
    if args.resume:
        from deco.checkpoint import load_checkpoint

        config = TrainConfig.from_dict(load_checkpoint(args.resume)["config"])
    elif args.config:
        config = TrainConfig.from_json(args.config)
    else:
        config = preset(args.preset)
    changes = {field: getattr(args, option) for option, field in OVERRIDES.items() if getattr(args, option) is not None}
    if "lr_drop_epochs" in changes:
        changes["lr_drop_epochs"] = tuple(changes["lr_drop_epochs"])
    config = config.replace(**changes)
    if not config.data:
        raise SystemExit("deco train: --data is required (unless --resume gives a checkpoint that names it)")
    return config


def run(args: argparse.Namespace) -> int:
    from deco import distributed
    from deco.engine import Trainer

    config = config_from_args(args)
    try:
        trainer = Trainer(config, resume=args.resume)
        metrics = trainer.fit()
        if trainer.last_eval_step != trainer.step:
            metrics = trainer.evaluate()
        if trainer.is_main and metrics:
            print(f"AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  (run directory {config.out})")
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.cleanup()
    return 0
