"""Training checkpoints: atomic writes, random-number-generator state capture, and loading.

A training checkpoint is a dict with ``"model"`` (state_dict), ``"optimizer"``, ``"lr_scheduler"``,
``"epoch"`` (the epoch in progress), ``"epoch_step"`` (optimizer steps already done in it), ``"step"``
(optimizer steps in total), ``"rng"`` (:func:`capture_rng_state`), ``"sampler"`` (the data order's seed,
epoch and position), ``"model_config"`` (``build_deco`` keyword arguments), ``"categories"`` (the dataset's)
and ``"config"`` (the training config as a dict); ``"best_ap"`` when evaluation has run.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["capture_rng_state", "load_checkpoint", "restore_rng_state", "save_checkpoint"]

REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "epoch_step", "step", "rng", "model_config")


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: a temporary file in the same directory, flushed to disk,
    then ``os.replace``, so a crash mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint written by :func:`save_checkpoint` and check that it has the keys needed
    to resume."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # weights_only=False: the checkpoint holds numpy and Python RNG states, which are not plain tensors.
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}: it is not a training checkpoint of `deco train`")
    return checkpoint


def capture_rng_state() -> dict:
    """The states of torch's CPU generator, every CUDA generator, NumPy's global and Python's ``random``."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when the same number of devices is present)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
