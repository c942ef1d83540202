"""AdamW parameter groups (backbone / encoder / rest, each with its own lr) and the step-decay lr schedule."""

from __future__ import annotations

import torch

from deco.config import TrainConfig

__all__ = ["StepDecaySchedule", "build_optimizer", "parameter_group_name"]


def parameter_group_name(name: str) -> str:
    """``"backbone"``, ``"encoder"`` or ``"rest"`` for a parameter name of the DECO model.

    The backbone is everything under the top-level ``backbone`` module; the encoder is any module called
    ``encoder`` (``deco_convnet.encoder._encoder...`` in the released layout)."""
    parts = name.split(".")
    if parts[0] == "backbone":
        return "backbone"
    if "encoder" in parts:
        return "encoder"
    return "rest"


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: lr ``config.lr`` for the decoder, heads and projection,
    ``config.lr_backbone`` for the backbone and ``config.lr_encoder`` for the encoder; one weight decay.
    Groups are named (``group["name"]``) and ordered backbone, encoder, rest; an empty group is left out.
    Build it after moving the model to its device."""
    lrs = {"backbone": config.lr_backbone, "encoder": config.lr_encoder, "rest": config.lr}
    grouped: dict[str, list[torch.nn.Parameter]] = {name: [] for name in lrs}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            grouped[parameter_group_name(name)].append(parameter)
    groups = [
        {"name": name, "params": params, "lr": lrs[name]} for name, params in grouped.items() if params
    ]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    # The fused implementation updates all tensors in one kernel per device: about 5x faster than the default
    # per-tensor loop on the CPU (0.02 s instead of 0.1 s per step for the demo model), which matters there.
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


class StepDecaySchedule:
    """Per-step learning rate: a linear warm-up over ``warmup_steps``, then ``base_lr * gamma ** k`` where k is
    the number of milestones (optimizer-step counts) already reached.

    Call :meth:`step` after every optimizer step. Milestones can be added while training (the demo drops the
    lr after a fraction of its time budget); they are part of :meth:`state_dict`, so a resumed run follows the
    same schedule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones=(), gamma: float = 0.1, warmup_steps: int = 0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        self.warmup_steps = warmup_steps
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        decay = self.gamma ** sum(step >= m for m in self.milestones)
        if self.warmup_steps and step < self.warmup_steps:
            decay *= (step + 1) / self.warmup_steps
        return decay

    def _apply(self) -> None:
        factor = self.factor(self.last_step)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def add_milestone(self, step: int) -> None:
        self.milestones = sorted(self.milestones + [int(step)])
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {
            "base_lrs": list(self.base_lrs),
            "milestones": list(self.milestones),
            "gamma": self.gamma,
            "warmup_steps": self.warmup_steps,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.milestones = list(state["milestones"])
        self.gamma = state["gamma"]
        self.warmup_steps = state["warmup_steps"]
        self.last_step = state["last_step"]
        self._apply()
