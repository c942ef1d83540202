"""The CIM back end ``adaptive_max_pool2d(z + gamma * ffn)`` as one op that never writes the full-resolution sum.

Layout: ``z`` and ``ffn`` are B x H x W x C (channels innermost, as the CIM's Linear layers leave them),
``gamma`` is C; the result is B x C x OH x OW in channels-last memory format, the same tensor as
``F.adaptive_max_pool2d((z + gamma * ffn).permute(0, 3, 1, 2), output_size)``. For low-precision z/ffn the
sum is formed in fp32 and rounded once, to z's dtype.

Backend ``"torch"`` is :func:`deco_kernels.reference.scale_residual_max_pool` (native autograd); ``"triton"``
and ``"cuda"`` (the backend name is an argument) run the custom op ``deco_kernels::scale_residual_max_pool``
(returns the pooled map, the argmax and ffn at the argmax) whose backward, the custom op
``deco_kernels::scale_residual_max_pool_backward``, routes each window's gradient to its argmax:
``grad_z = grad_s``, ``grad_ffn = gamma * grad_s``, ``grad_gamma = sum grad_y * ffn[argmax]`` (deterministic).
Pixels no window picked get zero gradients, grad_ffn included (autograd through the stock composition gives
``gamma * 0`` there, which differs only for a non-finite gamma).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deco_kernels import reference
from deco_kernels.backend import resolve_backend
from deco_kernels.ops._common import (
    check_activation,
    check_channel_parameter,
    check_same_device,
    check_same_dtype,
    empty_output,
    parameter_as_fp32,
    primitives,
)
from deco_kernels.ops._kernel_op import KernelOp
from deco_kernels.ops.adaptive_pool import _output_size

__all__ = ["scale_residual_max_pool"]

_OP = "scale_residual_max_pool"


def _scale_residual_max_pool_impl(
    z: torch.Tensor, ffn: torch.Tensor, gamma: torch.Tensor, output_size: list[int], backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z, ffn: B x H x W x C; gamma: C fp32 -> (y, indices, ffn at argmax): B x C x OH x OW, channels-last."""
    return primitives(backend, _OP).scale_residual_max_pool_forward(z, ffn, gamma, (output_size[0], output_size[1]))


def _scale_residual_max_pool_fake(z, ffn, gamma, output_size, backend):
    shape = (z.shape[0], z.shape[3], output_size[0], output_size[1])
    return (
        empty_output(shape, z, memory_format=torch.channels_last),
        empty_output(shape, z, dtype=torch.int64, memory_format=torch.channels_last),
        empty_output(shape, ffn, memory_format=torch.channels_last),
    )


_scale_residual_max_pool_op = KernelOp(
    "deco_kernels::scale_residual_max_pool", _scale_residual_max_pool_impl, _scale_residual_max_pool_fake, native=True
)


def _scale_residual_max_pool_backward_impl(
    grad_y: torch.Tensor,
    gamma: torch.Tensor,
    indices: torch.Tensor,
    picked_ffn: torch.Tensor,
    input_size: list[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_z, grad_ffn: B x H x W x C in grad_y's dtype, grad_gamma: C float32)."""
    return primitives(backend, _OP).scale_residual_max_pool_backward(
        grad_y, gamma, indices, picked_ffn, (input_size[0], input_size[1])
    )


def _scale_residual_max_pool_backward_fake(grad_y, gamma, indices, picked_ffn, input_size, backend):
    shape = (grad_y.shape[0], input_size[0], input_size[1], grad_y.shape[1])
    return (
        empty_output(shape, grad_y, memory_format=torch.contiguous_format),
        empty_output(shape, grad_y, memory_format=torch.contiguous_format),
        empty_output((grad_y.shape[1],), grad_y, dtype=torch.float32),
    )


_scale_residual_max_pool_backward_op = KernelOp(
    "deco_kernels::scale_residual_max_pool_backward",
    _scale_residual_max_pool_backward_impl,
    _scale_residual_max_pool_backward_fake,
)


def _setup_context(ctx, inputs, output):
    z, _, gamma, _, backend = inputs
    _, indices, picked_ffn = output
    ctx.mark_non_differentiable(indices, picked_ffn)
    ctx.save_for_backward(gamma, indices, picked_ffn)
    ctx.input_size = [z.shape[1], z.shape[2]]
    ctx.backend = backend


def _backward(ctx, grad_y, _grad_indices, _grad_picked_ffn):
    gamma, indices, picked_ffn = ctx.saved_tensors
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    grad_z, grad_ffn, grad_gamma = _scale_residual_max_pool_backward_op(
        grad_y, gamma, indices, picked_ffn, ctx.input_size, ctx.backend
    )
    return grad_z, grad_ffn, grad_gamma, None, None


_scale_residual_max_pool_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(z: torch.Tensor, ffn: torch.Tensor, gamma: torch.Tensor) -> None:
    check_activation(z, "z", _OP, layout="B x H x W x C")
    check_activation(ffn, "ffn", _OP, layout="B x H x W x C")
    if z.shape[3] < 1:
        raise ValueError(f"{_OP}: z must have C >= 1 (B x H x W x C), as max pooling needs; got {tuple(z.shape)}")
    check_same_device(z, "z", ffn, "ffn", _OP)
    check_same_dtype(z, "z", ffn, "ffn", _OP)
    if ffn.shape != z.shape:
        raise ValueError(f"{_OP}: ffn must have z's shape B x H x W x C {tuple(z.shape)}; got {tuple(ffn.shape)}")
    check_channel_parameter(gamma, "gamma", z.shape[3], z.device, _OP)


def scale_residual_max_pool(
    z: torch.Tensor,
    ffn: torch.Tensor,
    gamma: torch.Tensor,
    output_size: int | Sequence[int | None],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``adaptive_max_pool2d((z + gamma * ffn).permute(0, 3, 1, 2), output_size)`` without writing the sum.

    z, ffn: B x H x W x C, same dtype (float32/float16/bfloat16) and device; gamma: C (any floating dtype; its
    gradient comes back in its dtype); output_size: int or (OH, OW), None keeps that input dim. Returns
    B x C x OH x OW in z's dtype, channels-last memory format.
    """
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{_OP}: z must be a torch.Tensor; got {type(z).__name__}")
    backend = resolve_backend(z.device, backend, op=_OP)
    _check_inputs(z, ffn, gamma)
    size = _output_size(z.permute(0, 3, 1, 2), output_size, _OP)
    if backend == "torch":
        return reference.scale_residual_max_pool(z, ffn, gamma, size)
    # Both kernels take any strides (the CUDA host code makes its own dense copy where it needs one).
    y, _, _ = _scale_residual_max_pool_op(z, ffn, parameter_as_fp32(gamma), list(size), backend)
    return y
