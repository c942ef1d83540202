"""Input validation, memory-format and output-allocation helpers shared by every op.

The Triton launchers and the custom ops accept activations that are contiguous either in NCHW or in
channels-last order; :func:`as_supported_layout` brings anything else (a strided view, an expanded gradient
with stride 0) into the closer of the two, and :func:`empty_output` allocates results in the input's format.
Outputs of the launchers go through :func:`empty_output` so that tests can fill them with NaN
(:func:`poisoned_outputs`) and see any element a kernel forgot to write.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "as_supported_layout",
    "check_activation",
    "check_bias",
    "check_channel_parameter",
    "check_depthwise_weight",
    "check_same_device",
    "check_same_dtype",
    "empty_output",
    "is_supported_layout",
    "memory_format_of",
    "pair",
    "parameter_as_fp32",
    "poisoned_outputs",
    "primitives",
]

MAX_KERNEL_SIZE = 31
# depthwise_conv2d_layernorm normalises all C channels of a pixel in one program (Triton) or block (CUDA).
MAX_LAYERNORM_CHANNELS = 2048
_poison_outputs = False


def memory_format_of(t: torch.Tensor) -> torch.memory_format | None:
    """``torch.contiguous_format`` (NCHW), ``torch.channels_last`` or None (neither is contiguous).

    A tensor that is both (C == 1, or H == W == 1) counts as NCHW.
    """
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def is_supported_layout(t: torch.Tensor) -> bool:
    """True when ``t`` is NCHW- or channels-last-contiguous."""
    return memory_format_of(t) is not None


def as_supported_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when NCHW- or channels-last-contiguous, else a copy in the format its strides suggest.

    Expanded tensors (stride 0, e.g. the gradient of ``.sum()``) and strided views become dense here, so
    kernels never read through a broadcast stride they did not expect.
    """
    if is_supported_layout(t):
        return t
    return t.contiguous(memory_format=torch._prims_common.suggest_memory_format(t))


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within the block, :func:`empty_output` fills new buffers with NaN (floating) or -1 (integer).

    Tests use it so that an element a kernel never writes shows up as NaN (or an impossible index).
    """
    global _poison_outputs
    previous = _poison_outputs
    _poison_outputs = True
    try:
        yield
    finally:
        _poison_outputs = previous


def empty_output(
    shape: Sequence[int],
    like: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    memory_format: torch.memory_format | None = None,
) -> torch.Tensor:
    """An uninitialised tensor on ``like``'s device, in ``like``'s dtype and memory format (or the given ones).

    ``memory_format`` defaults to ``like``'s (NCHW when ``like`` is neither or not 4-D); ``shape`` need not be
    ``like``'s shape (pooling outputs). Poisoned inside :func:`poisoned_outputs`.
    """
    dtype = like.dtype if dtype is None else dtype
    if memory_format is None:
        memory_format = memory_format_of(like) if like.dim() == 4 else None
    if memory_format is None or len(shape) != 4:
        memory_format = torch.contiguous_format
    out = torch.empty(tuple(shape), dtype=dtype, device=like.device, memory_format=memory_format)
    if _poison_outputs:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def check_activation(t: torch.Tensor, name: str, op: str, layout: str = "B x C x H x W") -> None:
    """``t`` must be a 4-D float32, float16 or bfloat16 tensor with H, W >= 1 (B and C may be 0).

    ``layout`` names its dims ("B x C x H x W", or "B x H x W x C" for channels-innermost operands).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D ({layout}); got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16; got {t.dtype}")
    dims = layout.split(" x ")
    if t.shape[dims.index("H")] < 1 or t.shape[dims.index("W")] < 1:
        raise ValueError(f"{op}: {name} must have H >= 1 and W >= 1 ({layout}); got shape {tuple(t.shape)}")


def check_same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, op: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {b_name} must be on the same device as {a_name} ({a.device}); got {b.device}")


def check_same_dtype(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, op: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {b_name} must have the same dtype as {a_name} ({a.dtype}); got {b.dtype}")


def _check_floating_tensor_on(t: object, name: str, accepted: str, device: torch.device, op: str) -> None:
    """``t`` must be a floating-point tensor on ``device``; ``accepted`` says what ``name`` may be, for the error."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be {accepted}; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point; got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on the same device as the input ({device}); got {t.device}")


def check_depthwise_weight(weight: torch.Tensor, channels: int, device: torch.device, op: str) -> tuple[int, int]:
    """``weight`` must be a floating C x 1 x kh x kw tensor on ``device`` with odd kh, kw in 1..31.

    Returns (kh, kw).
    """
    _check_floating_tensor_on(weight, "weight", "a torch.Tensor", device, op)
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"{op}: weight must have shape C x 1 x kh x kw; got {tuple(weight.shape)}")
    if weight.shape[0] != channels:
        raise ValueError(
            f"{op}: weight has {weight.shape[0]} channels but the input has {channels} "
            f"(a depthwise weight is C x 1 x kh x kw)"
        )
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    for size, what in ((kh, "kh"), (kw, "kw")):
        if size % 2 == 0:
            raise ValueError(f"{op}: kernel size must be odd; got {what}={size} (weight {tuple(weight.shape)})")
        if not 1 <= size <= MAX_KERNEL_SIZE:
            raise ValueError(f"{op}: kernel size must be in 1..{MAX_KERNEL_SIZE}; got {what}={size}")
    return kh, kw


def check_channel_parameter(
    t: torch.Tensor | None, name: str, channels: int, device: torch.device, op: str, *, optional: bool = False
) -> None:
    """``t`` (argument ``name``) must be a floating tensor of shape (C,) on ``device``, or None if ``optional``."""
    if t is None and optional:
        return
    _check_floating_tensor_on(t, name, "a torch.Tensor or None" if optional else "a torch.Tensor", device, op)
    if tuple(t.shape) != (channels,):
        raise ValueError(f"{op}: {name} must have shape ({channels},) (one per channel); got {tuple(t.shape)}")


def check_bias(bias: torch.Tensor | None, channels: int, device: torch.device, op: str) -> None:
    """``bias`` must be None or a floating tensor of shape (C,) on ``device``."""
    check_channel_parameter(bias, "bias", channels, device, op, optional=True)


def pair(value: int | Sequence[int], name: str, op: str) -> tuple[int, int]:
    """``value`` as a pair of positive ints (an int means both)."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair_ = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        pair_ = tuple(value)
    else:
        raise ValueError(f"{op}: {name} must be an int or a pair of ints; got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair_):
        raise ValueError(f"{op}: {name} must be positive ints; got {value!r}")
    return pair_


def parameter_as_fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter (weight or bias) as the contiguous float32 tensor the primitives expect (no copy if it is)."""
    if t is None:
        return None
    return t.to(torch.float32).contiguous()


@functools.cache
def primitives(backend: str, op_module: str):
    """The module with a backend's primitives: ``deco_kernels.triton.<op_module>`` or ``deco_kernels._cuda``.

    Both provide the same function names and signatures (the primitive contract). Imported on first use
    (Triton need not be installed for the other backends) and cached: every op call looks it up, and an import
    lookup costs microseconds.
    """
    if backend == "triton":
        return importlib.import_module(f"deco_kernels.triton.{op_module}")
    if backend == "cuda":
        return importlib.import_module("deco_kernels._cuda")
    raise ValueError(f"deco_kernels: the custom ops run the 'triton' or 'cuda' backend; got {backend!r}")
