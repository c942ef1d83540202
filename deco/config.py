"""Training configuration: one dataclass, the COCO recipe of the paper as its defaults, and named presets.

A checkpoint stores the whole config (``dataclasses.asdict``) next to the model's ``build_deco`` keyword
arguments (:meth:`TrainConfig.model_kwargs`), so a run can be resumed or its model rebuilt from the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

__all__ = ["PRESETS", "TrainConfig", "demo_config", "preset", "tiny_config"]


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults: the spec's COCO recipe for DECO-R50."""

    # --- data ---
    data: str = ""  # COCO-format dataset root (see deco.data.build_dataset)
    train_split: str = "train"
    val_split: str = "val"
    train_scales: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    crop_resize: tuple[int, ...] = (400, 500, 600)
    crop_range: tuple[int, int] = (384, 600)
    eval_size: int = 800
    num_workers: int = 2

    # --- model (build_deco keyword arguments; num_classes comes from the dataset) ---
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    backbone_norm: str = "frozen"
    kernels: str = "auto"  # "fused" on CUDA, "stock" elsewhere
    # Run the model on channels-last (NHWC) tensors: conv weights are converted, so every activation from the
    # first conv on is channels-last. The weights and checkpoints are the same either way.
    channels_last: bool = False
    num_queries: int = 100
    query_grid: tuple[int, int] = (10, 10)
    d_model: int = 480
    encoder_dims: tuple[int, ...] = (120, 240, 480)
    encoder_depths: tuple[int, ...] = (2, 6, 2)
    num_decoder_layers: int = 6
    model_extra: dict = field(default_factory=dict)  # any further build_deco keyword arguments
    # Initial value of every layer-scale parameter (``*.gamma``: encoder blocks, SIM, CIM); None keeps the
    # release's 1e-6. A recipe setting, not an architecture one: it only changes the initial weights.
    layer_scale_init: float | None = None

    # --- optimisation ---
    epochs: int = 150
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_encoder: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop_epochs: tuple[int, ...] = (100,)  # lr x lr_gamma at the start of each of these epochs
    lr_gamma: float = 0.1
    warmup_steps: int = 0  # linear warm-up of every group's lr over the first steps (0: none)
    clip_max_norm: float = 0.1
    batch_size: int = 2  # per process
    amp: str = "none"  # "none" | "bf16"

    # --- run control ---
    out: str = "runs/deco"
    device: str = "auto"
    seed: int = 42
    eval_every: int = 1  # epochs; 0 = never evaluate during training
    checkpoint_every: int = 0  # optimizer steps; 0 = only at each epoch end
    log_every: int = 10  # optimizer steps between metrics-log lines
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps in total
    max_minutes: float | None = None  # stop (with a checkpoint) after this much training wall time
    lr_drop_at_time_fraction: float | None = None  # with max_minutes: drop the lr once this fraction has passed

    def model_kwargs(self, num_classes: int, kernels: str) -> dict:
        """The keyword arguments of ``deco.models.build_deco`` for this config."""
        return {
            "backbone": self.backbone,
            "num_classes": num_classes,
            "num_queries": self.num_queries,
            "query_grid": tuple(self.query_grid),
            "backbone_weights": self.backbone_weights,
            "kernels": kernels,
            "d_model": self.d_model,
            "encoder_dims": tuple(self.encoder_dims),
            "encoder_depths": tuple(self.encoder_depths),
            "num_decoder_layers": self.num_decoder_layers,
            "backbone_norm": self.backbone_norm,
            **self.model_extra,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str) -> TrainConfig:
        with open(path) as handle:
            values = json.load(handle)
        # JSON has no tuples; the dataclass's sequence fields are tuples.
        return cls.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def demo_config() -> TrainConfig:
    """A small DECO that trains on the synthetic shapes dataset from scratch within minutes on a CPU.

    Deviations from the COCO recipe, and why:
    - images resized to 96 px for training and evaluation (the synthetic images are 128 px), instead of
      480..800: the CPU budget is minutes, and at equal wall time 96 px did as well as 128 px (1.35x more
      steps; AP50 0.51 after 3360 steps, 28 epochs of 960 images, one thread of a shared CPU).
    - only the horizontal flip is random — no multi-scale resize and no random crop — so no batch is ever
      padded: the model does not use the padding mask, so padding shifts the frame the normalised boxes live
      in; in our CPU runs fixed-size batches reached AP50 0.12 after 720 steps where DETR's scaled-down
      multi-scale + crop augmentation reached 0.05.
    - ResNet-18 with trainable BatchNorm and no frozen stages (``backbone_norm="batch"``,
      ``freeze_backbone_stages=0``), no pretrained weights: nothing downloads, and a frozen, randomly
      initialised stem would never learn.
    - d_model 128, encoder dims (64, 128) with one block each, 3 decoder layers, 25 queries (5 x 5 grid), FFN
      ratio 4: about 1.2M parameters besides the 11.2M of the backbone.
    - lr 5e-4 for every group (not 1e-4 with 1e-5 for backbone and encoder): everything trains from scratch,
      the backbone as much as the rest (measured: total loss 11.7 vs 14.4 after 120 steps with 2e-4/1e-4);
      100 linear warm-up steps for the first, large-gradient steps.
    - layer-scale parameters start at 0.1 instead of 1e-6: with 1e-6 the encoder and decoder FFNs, whose
      gradients scale with it, barely train in a run this short (measured, weakly: AP50 0.039 vs 0.023 after
      480 steps).
    - gradient-norm clip 1.0 instead of 0.1 (0.1 slows from-scratch training further).
    - batch 8; a time budget instead of an epoch count (``max_minutes``, set by ``deco demo``), the lr
      dropping x0.1 after 80% of it.
    """
    return TrainConfig(
        train_scales=(96,),
        max_size=96,
        crop_resize=(96,),
        crop_range=(96, 96),  # a full-size crop: the crop branch changes nothing
        eval_size=96,
        num_workers=0,
        backbone="resnet18",
        backbone_norm="batch",
        num_queries=25,
        query_grid=(5, 5),
        d_model=128,
        encoder_dims=(64, 128),
        encoder_depths=(1, 1),
        num_decoder_layers=3,
        model_extra={"freeze_backbone_stages": 0},
        layer_scale_init=0.1,
        epochs=1000,
        lr=5e-4,
        lr_backbone=5e-4,
        lr_encoder=5e-4,
        lr_drop_epochs=(),
        warmup_steps=100,
        clip_max_norm=1.0,
        batch_size=8,
        eval_every=0,
        log_every=10,
        lr_drop_at_time_fraction=0.8,
    )


def tiny_config() -> TrainConfig:
    """The smallest DECO that runs the whole training path, for tests and smoke runs on 64 px images.

    Frozen BatchNorm (so per-process batches of any size give the same result), one encoder block, two
    decoder layers, 4 queries; the train transforms keep 64 x 64 images 64 x 64 (only the flip is random),
    so batches are never padded and data-parallel runs are comparable with one process."""
    return TrainConfig(
        train_scales=(64,),
        max_size=64,
        crop_resize=(64,),
        crop_range=(64, 64),
        eval_size=64,
        num_workers=0,
        backbone="resnet18",
        backbone_norm="frozen",
        num_queries=4,
        query_grid=(2, 2),
        d_model=32,
        encoder_dims=(32,),
        encoder_depths=(1,),
        num_decoder_layers=2,
        model_extra={"ffn_ratio": 2},
        epochs=2,
        lr_drop_epochs=(1,),
        warmup_steps=2,
        batch_size=2,
        eval_every=0,
        log_every=1,
        device="cpu",
        kernels="stock",
    )


PRESETS = {"coco": TrainConfig, "demo": demo_config, "tiny": tiny_config}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
    return PRESETS[name]()
