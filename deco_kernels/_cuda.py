"""The compiled extension ``deco_kernels._C`` (csrc/): its loader and the primitives of the "cuda" backend.

Importing ``deco_kernels._C`` registers ``torch.ops.deco_kernels_C.*`` for CUDA tensors (the CUDA kernels) and
for CPU tensors (CPU builds of the same kernel bodies, used to test them without a GPU). The functions below
are the primitive contract of ``deco_kernels`` (no autograd here; the custom ops in ``deco_kernels.ops`` call
them for backend "cuda"). Activations: B x C x H x W, float32/float16/bfloat16, NCHW or channels-last; weights
and biases float32. Outputs keep the activation's dtype and memory format; weight and bias grads are float32.
The CIM back end (``scale_residual_max_pool_*``) takes B x H x W x C ``z`` and ``ffn`` and a float32 ``gamma``;
its pooled outputs are channels-last.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from deco_kernels._source_digest import source_digest

__all__ = [
    "adaptive_avg_pool2d_backward",
    "adaptive_avg_pool2d_forward",
    "adaptive_max_pool2d_backward",
    "adaptive_max_pool2d_forward",
    "depthwise_conv2d_backward",
    "depthwise_conv2d_forward",
    "depthwise_conv2d_layernorm_backward",
    "depthwise_conv2d_layernorm_forward",
    "is_available",
    "load_error",
    "scale_residual_max_pool_backward",
    "scale_residual_max_pool_forward",
    "upsample_add_conv_backward",
    "upsample_add_conv_forward",
]


@functools.cache
def _load():
    try:
        from deco_kernels import _C  # importing registers the torch.ops.deco_kernels_C ops
    except ImportError as error:
        return error
    return _stale_build_error(_C)


class StaleBuildError(ImportError):
    """deco_kernels._C was built from other csrc/ sources than those beside the package."""


def _stale_build_error(module) -> StaleBuildError | None:
    """An error when ``module`` was built from other csrc/ sources than those beside the package, else None.

    An installed copy without its sources (no csrc/ beside the package) has nothing to compare with.
    """
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if not (csrc / "bindings.cpp").is_file():
        return None
    built, present = getattr(module, "source_digest", None), source_digest(csrc)
    if built == present:
        return None
    return StaleBuildError(
        f"{module.__file__} is out of date: it was built from other sources than {csrc} "
        f"(its source digest {built[:12] if built else 'is missing'}, the sources' {present[:12]})"
    )


def is_available() -> bool:
    """True when ``deco_kernels._C`` was built and imports."""
    return _load() is None


def load_error() -> str | None:
    """Why the extension is not available, or None."""
    error = _load()
    return None if error is None else str(error)


def is_stale() -> bool:
    """True when the extension imports but was built from other csrc/ sources (so it is not available)."""
    return isinstance(_load(), StaleBuildError)


def _ops():
    error = _load()
    if error is not None:
        raise RuntimeError(
            "deco_kernels: the CUDA extension deco_kernels._C is not available "
            f"({error}); rebuild with `pip install --no-build-isolation -e .` where nvcc is found"
        )
    return torch.ops.deco_kernels_C


def _pair(size: Sequence[int] | int, name: str) -> list[int]:
    if isinstance(size, int):
        return [size, size]
    size = list(size)
    if len(size) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {size!r}")
    return [int(s) for s in size]


def depthwise_conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: B x C x H x W; weight: C x 1 x kh x kw (odd, <= 31); bias: C or None. Returns y: B x C x H x W."""
    return _ops().depthwise_conv2d_forward(x, weight, bias)


def depthwise_conv2d_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, output_mask: Sequence[bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x B x C x H x W, grad_weight C x 1 x kh x kw, grad_bias C), None where output_mask is False."""
    return tuple(_ops().depthwise_conv2d_backward(grad_y, x, weight, [bool(m) for m in output_mask]))


def depthwise_conv2d_layernorm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LN over channels of dwconv(x): (out B x H x W x C contiguous in x's dtype, mean and rstd B x H x W fp32).

    x: B x C x H x W with C <= 2048; weight: C x 1 x kh x kw; bias: C or None; norm_weight, norm_bias: C.
    """
    return tuple(_ops().depthwise_conv2d_layernorm_forward(x, weight, bias, norm_weight, norm_bias, float(eps)))


def depthwise_conv2d_layernorm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """(grad_x B x C x H x W, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias), None where output_mask
    is False; grad_out: B x H x W x C; mean, rstd: the forward's B x H x W."""
    return tuple(_ops().depthwise_conv2d_layernorm_backward(
        grad_out, x, weight, bias, norm_weight, mean, rstd, [bool(m) for m in output_mask]
    ))


def upsample_add_conv_forward(
    query: torch.Tensor, memory: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``dwconv(u + memory) + u``, ``u`` = nearest upsampling of query (B x C x Hq x Wq) to memory's
    B x C x H x W. Returns B x C x H x W."""
    return _ops().upsample_add_conv_forward(query, memory, weight, bias)


def upsample_add_conv_backward(
    grad_y: torch.Tensor,
    query: torch.Tensor,
    memory: torch.Tensor,
    weight: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_query, grad_memory, grad_weight, grad_bias), None where output_mask is False."""
    return tuple(_ops().upsample_add_conv_backward(grad_y, query, memory, weight, [bool(m) for m in output_mask]))


def adaptive_max_pool2d_forward(x: torch.Tensor, output_size: Sequence[int] | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y B x C x oh x ow, int64 indices h * W + w into each input plane), like ``F.adaptive_max_pool2d``."""
    return tuple(_ops().adaptive_max_pool2d_forward(x, _pair(output_size, "output_size")))


def adaptive_max_pool2d_backward(
    grad_y: torch.Tensor, indices: torch.Tensor, input_size: Sequence[int]
) -> torch.Tensor:
    """grad_x: B x C x H x W for input_size (H, W), routed from each window (deterministic, no atomics)."""
    return _ops().adaptive_max_pool2d_backward(grad_y, indices, _pair(input_size, "input_size"))


def adaptive_avg_pool2d_forward(x: torch.Tensor, output_size: Sequence[int] | int) -> torch.Tensor:
    """y: B x C x oh x ow, like ``F.adaptive_avg_pool2d``."""
    return _ops().adaptive_avg_pool2d_forward(x, _pair(output_size, "output_size"))


def adaptive_avg_pool2d_backward(grad_y: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """grad_x: B x C x H x W for input_size (H, W), gathered."""
    return _ops().adaptive_avg_pool2d_backward(grad_y, _pair(input_size, "input_size"))


def scale_residual_max_pool_forward(
    z: torch.Tensor, ffn: torch.Tensor, gamma: torch.Tensor, output_size: Sequence[int] | int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max pool of ``z + gamma * ffn`` (z, ffn: B x H x W x C; gamma: C float32), summed in fp32.

    Returns ``y`` (B x C x OH x OW, z's dtype), ``indices`` (int64, flat ``h * W + w``) and ``picked_ffn`` (ffn at
    each argmax), all channels-last.
    """
    return tuple(_ops().scale_residual_max_pool_forward(z, ffn, gamma, _pair(output_size, "output_size")))


def scale_residual_max_pool_backward(
    grad_y: torch.Tensor,
    gamma: torch.Tensor,
    indices: torch.Tensor,
    picked_ffn: torch.Tensor,
    input_size: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_z, grad_ffn: B x H x W x C contiguous in grad_y's dtype, grad_gamma: C float32), routed; grad_gamma
    is reduced in a fixed order (deterministic, no atomics)."""
    return tuple(
        _ops().scale_residual_max_pool_backward(grad_y, gamma, indices, picked_ffn, _pair(input_size, "input_size"))
    )
