"""``deco_kernels.depthwise_conv2d``: the custom op ``deco_kernels::depthwise_conv2d`` and its autograd.

The "triton" and "cuda" backends share one torch.library custom op (the backend name is an argument), one
fake implementation and one autograd formula whose backward is the custom op
``deco_kernels::depthwise_conv2d_backward``, so torch.compile traces both directions without graph breaks.
The "torch" backend is :func:`deco_kernels.reference.depthwise_conv2d` with native autograd.
"""

from __future__ import annotations

import torch

from deco_kernels import reference
from deco_kernels.backend import resolve_backend
from deco_kernels.ops import _common
from deco_kernels.ops._kernel_op import KernelOp

__all__ = ["depthwise_conv2d"]

_OP = "depthwise_conv2d"


def _depthwise_conv2d_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str
) -> torch.Tensor:
    return _common.primitives(backend, "depthwise_conv2d").depthwise_conv2d_forward(
        x, _common.parameter_as_fp32(weight), _common.parameter_as_fp32(bias)
    )


def _depthwise_conv2d_fake(x, weight, bias, backend):
    return _common.empty_output(x.shape, x)


_depthwise_conv2d_op = KernelOp(
    "deco_kernels::depthwise_conv2d", _depthwise_conv2d_impl, _depthwise_conv2d_fake, native=True
)


def _depthwise_conv2d_backward_impl(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, output_mask: list[bool], backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight fp32, grad_bias fp32); an output not in ``output_mask`` is an empty tensor."""
    grads = _common.primitives(backend, "depthwise_conv2d").depthwise_conv2d_backward(
        grad_y, x, _common.parameter_as_fp32(weight), list(output_mask)
    )
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


def _depthwise_conv2d_backward_fake(grad_y, x, weight, output_mask, backend):
    need_x, need_weight, need_bias = output_mask
    channels = x.shape[1]
    return (
        _common.empty_output(x.shape, x) if need_x else x.new_empty(0),
        weight.new_empty(weight.shape, dtype=torch.float32) if need_weight else x.new_empty(0),
        weight.new_empty((channels,), dtype=torch.float32) if need_bias else x.new_empty(0),
    )


_depthwise_conv2d_backward_op = KernelOp(
    "deco_kernels::depthwise_conv2d_backward", _depthwise_conv2d_backward_impl, _depthwise_conv2d_backward_fake
)


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                   ctx.bias_dtype is not None and ctx.needs_input_grad[2]]
    # The gradient of e.g. .sum() arrives expanded (stride 0); the primitives take dense NCHW/channels-last.
    grad_y = _common.as_supported_layout(grad_y)
    grad_x, grad_weight, grad_bias = _depthwise_conv2d_backward_op(grad_y, x, weight, output_mask, ctx.backend)
    return (
        grad_x if output_mask[0] else None,
        grad_weight.to(weight.dtype) if output_mask[1] else None,
        grad_bias.to(ctx.bias_dtype) if output_mask[2] else None,
        None,
    )


_depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Depthwise 'same' convolution, stride 1: ``F.conv2d(x, weight, bias, padding=(kh//2, kw//2), groups=C)``.

    x: B x C x H x W, float32/float16/bfloat16, NCHW or channels-last (anything else is made contiguous in
    the format its strides suggest); weight: C x 1 x kh x kw with odd kh, kw in 1..31; bias: C or None.
    Returns B x C x H x W in x's dtype and memory format. ``backend``: "triton", "cuda", "torch" or None
    (the process-wide setting, see :mod:`deco_kernels.backend`).
    """
    _common.check_activation(x, "x", _OP)
    _common.check_depthwise_weight(weight, x.shape[1], x.device, _OP)
    _common.check_bias(bias, x.shape[1], x.device, _OP)
    backend = resolve_backend(x.device, backend, op=_OP)
    if backend == "torch":
        return reference.depthwise_conv2d(x, weight, bias)
    return _depthwise_conv2d_op(_common.as_supported_layout(x), weight, bias, backend)
