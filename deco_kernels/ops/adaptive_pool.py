"""Adaptive max and average pooling over H x W: public functions and their torch.library custom ops.

``adaptive_max_pool2d(x, output_size)`` and ``adaptive_avg_pool2d(x, output_size)`` compute exactly
``F.adaptive_max_pool2d`` / ``F.adaptive_avg_pool2d`` (PyTorch's overlapping window rule, first maximum wins,
NaN propagates). Backend ``"torch"`` runs :mod:`deco_kernels.reference` with native autograd; ``"triton"`` and
``"cuda"`` go through one custom op per op (``deco_kernels::adaptive_max_pool2d``,
``deco_kernels::adaptive_avg_pool2d``), whose backward is a second custom op (``..._backward``), each with a
fake implementation, so torch.compile traces them. The max pool's backward reuses the argmax saved by the
forward: one thread per window routes grad_y to the argmax on a zero-filled gradient, the first window that
picked an element writing the sum of all that did (deterministic, no atomics); the average backward is a gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deco_kernels import reference
from deco_kernels.backend import resolve_backend
from deco_kernels.ops._common import (
    as_supported_layout,
    check_activation,
    empty_output,
    memory_format_of,
    primitives,
)
from deco_kernels.ops._kernel_op import KernelOp

__all__ = ["adaptive_avg_pool2d", "adaptive_max_pool2d"]

_KERNEL_BACKENDS = ("triton", "cuda")
_MODULE = "adaptive_pool"  # deco_kernels.triton.adaptive_pool holds the Triton primitives


def _pooled_shape(x: torch.Tensor, output_size: Sequence[int]) -> tuple[int, int, int, int]:
    return (x.shape[0], x.shape[1], output_size[0], output_size[1])


def _layout_of(t: torch.Tensor) -> torch.memory_format:
    return memory_format_of(t) or torch.contiguous_format


# --- max pooling -------------------------------------------------------------------------------------------


def _adaptive_max_pool2d_impl(
    x: torch.Tensor, output_size: list[int], backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: B x C x H x W -> (y: B x C x OH x OW in x's dtype, indices: int64 flat h*W+w), x's memory format."""
    return primitives(backend, _MODULE).adaptive_max_pool2d_forward(x, (output_size[0], output_size[1]))


def _adaptive_max_pool2d_fake(x, output_size, backend):
    shape = _pooled_shape(x, output_size)
    return empty_output(shape, x), empty_output(shape, x, dtype=torch.int64)


_adaptive_max_pool2d_op = KernelOp(
    "deco_kernels::adaptive_max_pool2d", _adaptive_max_pool2d_impl, _adaptive_max_pool2d_fake, native=True
)


def _adaptive_max_pool2d_backward_impl(
    grad_y: torch.Tensor, indices: torch.Tensor, input_size: list[int], backend: str
) -> torch.Tensor:
    """grad_y, indices: B x C x OH x OW -> grad_x: B x C x H x W in grad_y's dtype and memory format."""
    return primitives(backend, _MODULE).adaptive_max_pool2d_backward(grad_y, indices, (input_size[0], input_size[1]))


def _adaptive_max_pool2d_backward_fake(grad_y, indices, input_size, backend):
    return empty_output((grad_y.shape[0], grad_y.shape[1], input_size[0], input_size[1]), grad_y)


_adaptive_max_pool2d_backward_op = KernelOp(
    "deco_kernels::adaptive_max_pool2d_backward", _adaptive_max_pool2d_backward_impl, _adaptive_max_pool2d_backward_fake
)


def _max_setup_context(ctx, inputs, output):
    x, _, backend = inputs
    _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(indices)
    ctx.input_size = [x.shape[2], x.shape[3]]
    ctx.backend = backend


def _max_backward(ctx, grad_y, _grad_indices):
    (indices,) = ctx.saved_tensors
    # In the indices' (= x's) layout, so grad_x comes back in x's layout; also densifies expanded gradients.
    grad_y = grad_y.contiguous(memory_format=_layout_of(indices))
    grad_x = _adaptive_max_pool2d_backward_op(grad_y, indices, ctx.input_size, ctx.backend)
    return grad_x, None, None


_adaptive_max_pool2d_op.register_autograd(_max_backward, setup_context=_max_setup_context)


def _max_backward_setup_context(ctx, inputs, output):
    _, indices, _, _ = inputs
    ctx.save_for_backward(indices)


def _max_double_backward(ctx, grad_grad_x):
    # The max backward is linear in grad_y: its adjoint reads grad_grad_x at each window's argmax.
    (indices,) = ctx.saved_tensors
    batch, channels = indices.shape[:2]
    picked = grad_grad_x.reshape(batch, channels, -1).gather(2, indices.reshape(batch, channels, -1))
    return picked.view(indices.shape), None, None, None


_adaptive_max_pool2d_backward_op.register_autograd(
    _max_double_backward, setup_context=_max_backward_setup_context
)


# --- average pooling ---------------------------------------------------------------------------------------


def _adaptive_avg_pool2d_impl(x: torch.Tensor, output_size: list[int], backend: str) -> torch.Tensor:
    """x: B x C x H x W -> y: B x C x OH x OW in x's dtype and memory format."""
    return primitives(backend, _MODULE).adaptive_avg_pool2d_forward(x, (output_size[0], output_size[1]))


def _adaptive_avg_pool2d_fake(x, output_size, backend):
    return empty_output(_pooled_shape(x, output_size), x)


_adaptive_avg_pool2d_op = KernelOp(
    "deco_kernels::adaptive_avg_pool2d", _adaptive_avg_pool2d_impl, _adaptive_avg_pool2d_fake, native=True
)


def _adaptive_avg_pool2d_backward_impl(grad_y: torch.Tensor, input_size: list[int], backend: str) -> torch.Tensor:
    """grad_y: B x C x OH x OW -> grad_x: B x C x H x W in grad_y's dtype and memory format."""
    return primitives(backend, _MODULE).adaptive_avg_pool2d_backward(grad_y, (input_size[0], input_size[1]))


def _adaptive_avg_pool2d_backward_fake(grad_y, input_size, backend):
    return empty_output((grad_y.shape[0], grad_y.shape[1], input_size[0], input_size[1]), grad_y)


_adaptive_avg_pool2d_backward_op = KernelOp(
    "deco_kernels::adaptive_avg_pool2d_backward", _adaptive_avg_pool2d_backward_impl, _adaptive_avg_pool2d_backward_fake
)


def _avg_setup_context(ctx, inputs, output):
    x, _, backend = inputs
    ctx.input_size = [x.shape[2], x.shape[3]]
    ctx.layout = _layout_of(x)
    ctx.backend = backend


def _avg_backward(ctx, grad_y):
    grad_y = grad_y.contiguous(memory_format=ctx.layout)
    return _adaptive_avg_pool2d_backward_op(grad_y, ctx.input_size, ctx.backend), None, None


_adaptive_avg_pool2d_op.register_autograd(_avg_backward, setup_context=_avg_setup_context)


def _avg_backward_setup_context(ctx, inputs, output):
    grad_y, _, backend = inputs
    ctx.output_size = [grad_y.shape[2], grad_y.shape[3]]
    ctx.layout = _layout_of(grad_y)
    ctx.backend = backend


def _avg_double_backward(ctx, grad_grad_x):
    # The avg backward is linear in grad_y and its adjoint is the avg pool itself.
    grad_grad_x = grad_grad_x.contiguous(memory_format=ctx.layout)
    return _adaptive_avg_pool2d_op(grad_grad_x, ctx.output_size, ctx.backend), None, None


_adaptive_avg_pool2d_backward_op.register_autograd(
    _avg_double_backward, setup_context=_avg_backward_setup_context
)


# --- public functions --------------------------------------------------------------------------------------


def _output_size(
    x: torch.Tensor, output_size: int | None | Sequence[int | None], op: str
) -> tuple[int, int]:
    """``output_size`` as (OH, OW): an int means both; a None entry keeps the input's size, as torch allows."""
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        sizes = (output_size, output_size)
    elif isinstance(output_size, (tuple, list, torch.Size)) and len(output_size) == 2:
        sizes = tuple(output_size)
    else:
        raise ValueError(f"{op}: output_size must be an int or a pair of ints (None keeps a dim); got {output_size!r}")
    sizes = tuple(x.shape[2 + dim] if size is None else size for dim, size in enumerate(sizes))
    if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in sizes):
        raise ValueError(f"{op}: output_size must be positive ints (or None); got {output_size!r}")
    return sizes


def _check_input(x: torch.Tensor, backend: str, op: str) -> None:
    if backend in _KERNEL_BACKENDS:
        check_activation(x, "x", op)
    elif not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a 4-D (B x C x H x W) floating tensor; got {got}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{op}: x must have H >= 1 and W >= 1; got shape {tuple(x.shape)}")


def _resolve(x: torch.Tensor, backend: str | None, op: str) -> str:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor; got {type(x).__name__}")
    return resolve_backend(x.device, backend, op=op)


def adaptive_max_pool2d(
    x: torch.Tensor, output_size: int | Sequence[int | None], *, backend: str | None = None
) -> torch.Tensor:
    """``F.adaptive_max_pool2d(x, output_size)``.

    x: B x C x H x W (float32/float16/bfloat16 for the kernel backends; NCHW, channels-last or any strides);
    output_size: int or (OH, OW), None entries keep the input size. Returns B x C x OH x OW in x's dtype and
    (for NCHW or channels-last x) memory format. ``backend``: "triton", "cuda", "torch" or None (the process
    setting, see :mod:`deco_kernels.backend`).
    """
    op = "adaptive_max_pool2d"
    backend = _resolve(x, backend, op)
    _check_input(x, backend, op)
    size = _output_size(x, output_size, op)
    if backend == "torch":
        return reference.adaptive_max_pool2d(x, size)
    y, _ = _adaptive_max_pool2d_op(as_supported_layout(x), list(size), backend)
    return y


def adaptive_avg_pool2d(
    x: torch.Tensor, output_size: int | Sequence[int | None], *, backend: str | None = None
) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)``.

    x: B x C x H x W (float32/float16/bfloat16 for the kernel backends; NCHW, channels-last or any strides);
    output_size: int or (OH, OW), None entries keep the input size. Returns B x C x OH x OW in x's dtype and
    (for NCHW or channels-last x) memory format. ``backend`` as for :func:`adaptive_max_pool2d`.
    """
    op = "adaptive_avg_pool2d"
    backend = _resolve(x, backend, op)
    _check_input(x, backend, op)
    size = _output_size(x, output_size, op)
    if backend == "torch":
        return reference.adaptive_avg_pool2d(x, size)
    return _adaptive_avg_pool2d_op(as_supported_layout(x), list(size), backend)
