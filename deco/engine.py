"""The training run: data, model, loss and optimizer set up from a :class:`~deco.config.TrainConfig`, the
train loop (AdamW, step-decay lr, gradient clipping, optional bf16 autocast, data parallel under torchrun),
periodic evaluation, a JSON-lines metrics log and exactly resumable checkpoints.

Exact resumption rests on three things: the data order of an epoch is a function of (seed, epoch) only and a
resumed run skips the samples already seen (:class:`~deco.distributed.ResumableSampler`); each sample's
augmentation is a function of (seed, epoch, index) only (:class:`~deco.distributed.SeededSampleDataset`); and
model, optimizer, lr schedule and RNG states are all saved. On the CPU, N steps straight and N/2 + resume +
N/2 give bitwise-equal weights and optimizer state (``tests/test_resume.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from deco import distributed
from deco.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from deco.config import TrainConfig
from deco.losses import build_criterion
from deco.optim import StepDecaySchedule, build_optimizer

__all__ = ["Trainer", "resolve_device", "resolve_kernels"]

logger = logging.getLogger(__name__)

AMP_MODES = ("none", "bf16")


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is present, else ``"cpu"``; anything else is returned checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA device is present")
    return device


def resolve_kernels(kernels: str, device: torch.device) -> str:
    """``"auto"`` -> ``"fused"`` on CUDA (the Triton/CUDA kernels), ``"stock"`` elsewhere (plain PyTorch)."""
    if kernels == "auto":
        return "fused" if device.type == "cuda" else "stock"
    if kernels not in ("fused", "stock"):
        raise ValueError(f"kernels must be 'fused', 'stock' or 'auto'; got {kernels!r}")
    return kernels


def _targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


class Trainer:
    """One training run (one process of it under torchrun).

    ``Trainer(config, resume=None)`` builds everything; :meth:`fit` trains until ``config.epochs`` (or
    ``max_steps`` / ``max_minutes``) and returns the last evaluation metrics (or ``{}``); :meth:`evaluate`
    runs COCO evaluation on the val split. Files in ``config.out``: ``last.pt`` (every ``checkpoint_every``
    steps, at each epoch end, when stopping early and on Ctrl-C), ``best.pt`` (highest AP), ``metrics.jsonl``
    and ``config.json``.
    """

    def __init__(self, config: TrainConfig, resume: str | None = None):
        # Imported here so that the matcher/loss/optimizer modules do not depend on the model and data code.
        from deco.data import build_dataset, collate_fn, make_transforms
        from deco.models import build_deco

        if config.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}; got {config.amp!r}")
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {config.batch_size}")
        if not config.data:
            raise ValueError("config.data (the dataset root) is empty")
        self.config = config
        self.device = distributed.init_distributed(resolve_device(config.device))
        self.kernels = resolve_kernels(config.kernels, self.device)
        self.is_main = distributed.is_main_process()
        self.out = Path(config.out)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        logger.info("training on %s with kernels=%s%s (world size %d)", self.device, self.kernels,
                    ", channels-last" if config.channels_last else "", distributed.get_world_size())

        train_transforms = make_transforms(
            True, scales=config.train_scales, max_size=config.max_size, crop_resize=config.crop_resize,
            crop_range=config.crop_range, eval_size=config.eval_size,
        )
        eval_transforms = make_transforms(False, max_size=config.max_size, eval_size=config.eval_size)
        self.train_set = build_dataset(config.data, config.train_split, train=True, transforms=train_transforms)
        self.val_set = build_dataset(config.data, config.val_split, train=False, transforms=eval_transforms)
        self.categories = list(self.train_set.categories)
        num_classes = len(self.categories)

        self.sampler = distributed.ResumableSampler(len(self.train_set), shuffle=True, seed=config.seed)
        self.train_loader = torch.utils.data.DataLoader(
            distributed.SeededSampleDataset(self.train_set, seed=config.seed),
            batch_size=config.batch_size,
            sampler=self.sampler,
            collate_fn=collate_fn,
            num_workers=config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        val_sampler = (
            torch.utils.data.DistributedSampler(self.val_set, shuffle=False) if distributed.is_distributed() else None
        )
        self.val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=config.batch_size, sampler=val_sampler, shuffle=False, collate_fn=collate_fn,
            num_workers=config.num_workers,
        )
        self.steps_per_epoch = math.ceil(self.sampler.samples_per_rank / config.batch_size)

        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(config.seed)
        self.model_config = config.model_kwargs(num_classes, self.kernels)
        self.model = build_deco(**self.model_config).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if config.layer_scale_init is not None:
            with torch.no_grad():
                for name, parameter in self.model.named_parameters():
                    if name.rsplit(".", 1)[-1] == "gamma":
                        parameter.fill_(config.layer_scale_init)
        self.criterion = build_criterion(num_classes, num_aux_layers=config.num_decoder_layers - 1).to(self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.schedule = StepDecaySchedule(
            self.optimizer,
            milestones=[epoch * self.steps_per_epoch for epoch in config.lr_drop_epochs],
            gamma=config.lr_gamma,
            warmup_steps=config.warmup_steps,
        )
        self.train_model = self.model
        if distributed.is_distributed():
            # Only trainable BatchNorm statistics need rank 0's copy before each forward; frozen buffers are the same
            # on every rank, and broadcasting them would cost a collective per step. Gradients as views of the
            # all-reduce buckets save a copy of every gradient per step and their memory.
            running_statistics = any(
                isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
                for module in self.model.modules()
            )
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=running_statistics,
                gradient_as_bucket_view=True,
            )

        self.epoch = 0
        self.epoch_step = 0
        self.step = 0
        self.best_ap: float | None = None
        self.train_seconds = 0.0
        self.last_eval_step: int | None = None
        if resume:
            self.load(resume)
        if self.is_main:
            (self.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.schedule.state_dict(),
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "step": self.step,
            "rng": capture_rng_state(),
            "sampler": {**self.sampler.state_dict(), "epoch": self.epoch, "start": self.epoch_step * self.config.batch_size},
            "model_config": self.model_config,
            "categories": self.categories,
            "config": self.config.to_dict(),
            "best_ap": self.best_ap,
            "train_seconds": self.train_seconds,
        }

    def save(self, name: str = "last.pt") -> Path | None:
        """Write the current state to ``out/name`` (main process only; atomically)."""
        if not self.is_main:
            return None
        return save_checkpoint(self.out / name, self.checkpoint())

    def load(self, path: str) -> None:
        checkpoint = load_checkpoint(path, map_location="cpu")
        if checkpoint["sampler"]["seed"] != self.config.seed:
            raise ValueError(
                f"checkpoint {path} was trained with seed {checkpoint['sampler']['seed']}, this run has seed "
                f"{self.config.seed}: the data order would not continue"
            )
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["lr_scheduler"])
        self.epoch = checkpoint["epoch"]
        self.epoch_step = checkpoint["epoch_step"]
        self.step = checkpoint["step"]
        self.best_ap = checkpoint.get("best_ap")
        self.train_seconds = checkpoint.get("train_seconds", 0.0)
        # Every rank restores rank 0's generator states; the data does not depend on them (it is seeded per
        # sample), only anything random inside the model would.
        restore_rng_state(checkpoint["rng"])
        logger.info("resumed from %s at epoch %d, step %d (%d into the epoch)", path, self.epoch, self.step,
                    self.epoch_step)

    # ------------------------------------------------------------------ logging
    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ training
    def autocast(self):
        if self.config.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _stop_and_drop(self, started: float) -> tuple[bool, bool]:
        """Whether to stop now and whether to drop the lr now, agreed by all ranks (rank 0's clock decides)."""
        config = self.config
        stop = config.max_steps is not None and self.step >= config.max_steps
        drop = False
        if config.max_minutes is not None:
            elapsed = self.train_seconds + time.perf_counter() - started
            stop = stop or elapsed >= 60 * config.max_minutes
            fraction = config.lr_drop_at_time_fraction
            drop = fraction is not None and elapsed >= fraction * 60 * config.max_minutes
        if distributed.is_distributed():
            flags = torch.tensor([float(stop), float(drop)], device=self.device)
            torch.distributed.broadcast(flags, src=0)
            stop, drop = bool(flags[0]), bool(flags[1])
        return stop, drop

    def train_epoch(self, started: float) -> bool:
        """Train the rest of the current epoch; return False when stopped early (max_steps / max_minutes)."""
        config = self.config
        self.model.train()
        self.criterion.train()
        self.sampler.set_epoch(self.epoch, self.epoch_step * config.batch_size)
        images_seen = 0
        window_start = time.perf_counter()
        progress = tqdm(
            self.train_loader, total=self.steps_per_epoch, initial=self.epoch_step, disable=not self.is_main,
            desc=f"epoch {self.epoch}", dynamic_ncols=True, leave=False,
        )
        # A time-triggered drop is recorded as a schedule milestone, so a resumed run does not drop twice.
        time_drop_done = any(m <= self.step for m in self.schedule.milestones)
        for images, mask, targets in progress:
            stop, drop = self._stop_and_drop(started)
            if stop:
                progress.close()
                return False
            if drop and not time_drop_done:
                self.schedule.add_milestone(self.step)
                time_drop_done = True
                logger.info("lr dropped x%g at step %d (time budget fraction reached)", config.lr_gamma, self.step)
            images = images.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            targets = _targets_to(targets, self.device)
            with self.autocast():
                outputs = self.train_model(images, mask)
            losses = self.criterion(outputs, targets)
            loss = self.criterion.total(losses)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {self.step} (epoch {self.epoch}); unweighted losses: "
                    f"{ {k: v.item() for k, v in losses.items()} }"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = None
            if config.clip_max_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_max_norm)
            self.optimizer.step()
            self.schedule.step()
            self.step += 1
            self.epoch_step += 1
            images_seen += images.shape[0] * distributed.get_world_size()

            if self.step % config.log_every == 0 or self.epoch_step == self.steps_per_epoch:
                elapsed = time.perf_counter() - window_start
                # One collective and one host sync for everything logged, not one per loss term.
                logged = [k for k in ("loss_ce", "loss_bbox", "loss_giou") if k in losses]
                values = distributed.all_reduce_mean(torch.stack([loss.detach(), *(losses[k].detach() for k in logged)]))
                total, *terms = values.tolist()
                record = {
                    "epoch": self.epoch,
                    "step": self.step,
                    "loss": total,
                    **dict(zip(logged, terms)),
                    "lr": self.optimizer.param_groups[-1]["lr"],
                    "images_per_s": images_seen / max(elapsed, 1e-9),
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                self.log(record)
                progress.set_postfix(
                    loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}"
                )
                images_seen = 0
                window_start = time.perf_counter()
            if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                self.save()
        progress.close()
        return True

    def fit(self) -> dict:
        """Train to the end of the configured run; return the last evaluation metrics ({} if none ran)."""
        config = self.config
        metrics: dict = {}
        started = time.perf_counter()
        try:
            while self.epoch < config.epochs:
                finished = self.train_epoch(started)
                if not finished:
                    break
                self.epoch += 1
                self.epoch_step = 0
                self.train_seconds += time.perf_counter() - started
                started = time.perf_counter()
                if config.eval_every and self.epoch % config.eval_every == 0:
                    metrics = self.evaluate()
                self.save()
            self.train_seconds += time.perf_counter() - started
            started = time.perf_counter()
            self.save()
        except KeyboardInterrupt:
            self.train_seconds += time.perf_counter() - started
            path = self.save()
            logger.warning("interrupted at step %d; state saved to %s", self.step, path)
            raise
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """COCO evaluation on the val split, every rank on its shard (the metrics are the same on every
        rank). Logs them, keeps ``best.pt`` by AP and returns the dict of the 12 COCO metrics."""
        from deco.evaluation import CocoEvaluator, evaluate

        self.last_eval_step = self.step
        evaluator = CocoEvaluator(self.val_set.coco, self.val_set.categories)
        with self.autocast():
            metrics = evaluate(self.model, self.val_loader, evaluator, self.device, progress=self.is_main)
        metrics = {k: float(v) for k, v in metrics.items()}
        self.log({"epoch": self.epoch, "step": self.step, "eval": metrics})
        logger.info("epoch %d step %d: AP %.4f AP50 %.4f", self.epoch, self.step, metrics["AP"], metrics["AP50"])
        if self.best_ap is None or metrics["AP"] > self.best_ap:
            self.best_ap = metrics["AP"]
            self.save("best.pt")
        return metrics
