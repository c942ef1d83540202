"""The implementations raced in the microbenchmarks, and the inputs each op is called with.

Providers (the ``provider`` field of a record):

- ``deco-triton`` / ``deco-triton-cl``: the public ``deco_kernels`` op with ``backend="triton"`` on NCHW /
  channels-last activations; ``deco-cuda`` / ``deco-cuda-cl``: the same with ``backend="cuda"``;
  ``deco-torch``: ``backend="torch"`` (the reference composition behind the same entry point; runs anywhere).
- ``eager-nchw`` / ``eager-cl``: the stock composition of :mod:`deco_kernels.reference` in eager mode.
- ``compile``: ``torch.compile`` (default mode) of the stock composition on NCHW inputs;
  ``compile-max-autotune``: the same with ``mode="max-autotune"``.

Every provider gets the same random inputs (activations in the benchmark dtype, parameters too, as a module
converted to that dtype would hold them) and the same gradient of the output. ``scale_residual_max_pool`` takes
B x H x W x C ``z`` and ``ffn``: for the ``-cl`` providers they are dense (channels innermost, as the CIM's
Linear layers leave them), for the others B x H x W x C views of NCHW memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

import deco_kernels
from deco_kernels import reference
from deco_kernels.backend import available_backends

from benchmarks.cases import Case

__all__ = ["BASELINES", "DECO_PROVIDERS", "PROVIDERS", "Inputs", "make_inputs", "provider_function", "unavailable"]

DECO_PROVIDERS = ("deco-triton", "deco-triton-cl", "deco-cuda", "deco-cuda-cl", "deco-torch")
BASELINES = ("eager-nchw", "eager-cl", "compile", "compile-max-autotune")
PROVIDERS = DECO_PROVIDERS + BASELINES
# Default set of a GPU run; deco-torch is the eager NCHW composition again, so only the smoke run uses it.
DEFAULT_PROVIDERS = ("deco-triton", "deco-triton-cl", "deco-cuda", "deco-cuda-cl", "eager-nchw", "eager-cl", "compile")


@dataclass
class Inputs:
    """Arguments of one call: ``tensors`` are positional (activations first), ``extra`` trailing non-tensors;
    ``differentiable`` are the tensors whose gradients the backward pass computes."""

    tensors: list[torch.Tensor | None]
    extra: tuple
    differentiable: list[torch.Tensor]


def _layout(provider: str) -> torch.memory_format:
    return torch.channels_last if provider.endswith("-cl") else torch.contiguous_format


# The ops with a depthwise conv: activations, then the conv's weight, then per-channel parameters.
_CONV_OPS = ("depthwise_conv2d", "depthwise_conv2d_layernorm", "upsample_add_conv")


def _draw_specs(case: Case) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, shape) of each random tensor of ``case``, in draw order: ``activation`` or ``parameter``."""
    dims = case.dims
    b, c = dims["B"], dims["C"]
    plane = (b, c, dims["H"], dims["W"])
    if case.op == "scale_residual_max_pool":
        return [("activation", plane), ("activation", plane), ("parameter", (c,))]
    if case.op not in _CONV_OPS:
        return [("activation", plane)]  # the pools
    weight = (c, 1, dims["kh"], dims["kw"])
    if case.op == "depthwise_conv2d":
        return [("activation", plane), ("parameter", weight), ("parameter", (c,))]
    if case.op == "depthwise_conv2d_layernorm":
        return [("activation", plane), ("parameter", weight)] + [("parameter", (c,))] * 3
    query = (b, c, dims["Hq"], dims["Wq"])  # upsample_add_conv
    return [("activation", query), ("activation", plane), ("parameter", weight), ("parameter", (c,))]


@functools.lru_cache(maxsize=2)
def _draws(case: Case, seed: int) -> tuple[torch.Tensor, ...]:
    # Every provider, dtype and pass of a case draws the same values: drawing a stride-8 map on the host takes
    # about 0.2 s, longer than most rows' timing, so the draws of the latest cases are kept (read-only).
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*shape, generator=generator) * (0.1 if kind == "parameter" else 1.0)
        for kind, shape in _draw_specs(case)
    )


def make_inputs(case: Case, dtype: torch.dtype, provider: str, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs of ``case`` (the same values for every provider: drawn from ``seed``), in the provider's
    memory format, with ``requires_grad`` set on activations and parameters."""
    layout = _layout(provider)
    tensors = [
        # One copy in the provider's layout (activations) or as drawn (parameters); copy=True: the cached draw
        # itself must never become a (CPU, float32) input.
        draw.to(
            device=device, dtype=dtype, copy=True,
            memory_format=layout if kind == "activation" else torch.preserve_format,
        ).requires_grad_()
        for draw, (kind, _) in zip(_draws(case, seed), _draw_specs(case))
    ]
    if case.op == "scale_residual_max_pool":
        # B x C x H x W maps in the provider's memory format, viewed as B x H x W x C.
        z, ffn = (t.detach().permute(0, 2, 3, 1).requires_grad_() for t in tensors[:2])
        gamma = tensors[2]
        return Inputs([z, ffn, gamma], ((case.dims["oh"], case.dims["ow"]),), [z, ffn, gamma])
    if case.op in _CONV_OPS:
        return Inputs(tensors, (), list(tensors))
    return Inputs(tensors, ((case.dims["oh"], case.dims["ow"]),), tensors)


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device`` here, or None when it can."""
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}; expected one of {PROVIDERS}"
    if provider.startswith("deco-") and provider != "deco-torch":
        backend = provider.split("-")[1]
        if device.type != "cuda":
            return f"{provider} needs a CUDA device (benchmarks of the {backend} backend are GPU-only)"
        if backend not in available_backends(device):
            return f"{provider}: the {backend} backend is not available on {device} (build or install missing)"
    return None


def _stock(op: str) -> Callable:
    # The reference's adaptive_max_pool2d takes return_indices; the stock composition never asks for them.
    return getattr(reference, op)


@functools.cache
def _compiled(op: str, mode: str | None, compile_backend: str, case: Case, dtype: torch.dtype) -> Callable:
    # One compiled function per (case, dtype), static shapes: the strongest compile baseline, and no
    # recompile-limit surprises across the matrix.
    return torch.compile(_stock(op), mode=mode, dynamic=False, backend=compile_backend)


def provider_function(
    provider: str, case: Case, dtype: torch.dtype, compile_backend: str = "inductor"
) -> Callable[..., torch.Tensor]:
    """The callable that computes ``case.op`` for ``provider``; call it with ``*inputs.tensors, *inputs.extra``."""
    op = case.op
    if provider.startswith("deco-"):
        backend = provider.split("-")[1]
        public = getattr(deco_kernels, op)
        return functools.partial(public, backend=backend)
    if provider.startswith("eager-"):
        return _stock(op)
    if provider == "compile":
        return _compiled(op, None, compile_backend, case, dtype)
    if provider == "compile-max-autotune":
        # Non-inductor backends (the smoke run's "eager") take no mode.
        mode = "max-autotune" if compile_backend == "inductor" else None
        return _compiled(op, mode, compile_backend, case, dtype)
    raise ValueError(f"provider must be one of {PROVIDERS}; got {provider!r}")
