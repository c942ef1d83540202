"""Triton kernels and their launchers (the "triton" backend's primitives; no autograd here)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = ["on_input_device"]


def on_input_device(primitive: Callable) -> Callable:
    """Run ``primitive`` with the CUDA device of its first argument current.

    Triton launches on the current device, which need not hold the tensors (a model on cuda:1 in a process
    that never called ``torch.cuda.set_device``); the CUDA backend's host code guards the device itself.
    """

    @functools.wraps(primitive)
    def launch(first: torch.Tensor, *args, **kwargs):
        device = first.device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return primitive(first, *args, **kwargs)
        return primitive(first, *args, **kwargs)

    return launch
