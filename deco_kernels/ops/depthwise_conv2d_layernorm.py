"""``deco_kernels.depthwise_conv2d_layernorm``: LayerNorm over channels of a depthwise conv, channels-last out.

DECO's encoder blocks and SIMs consume their depthwise conv output only through a LayerNorm over channels
whose B x H x W x C output feeds the Linear layers; this op does both without writing the conv output.
The "triton" and "cuda" backends share one torch.library custom op ``deco_kernels::depthwise_conv2d_layernorm``
(the backend name is an argument; it returns the output and the per-pixel mean and rstd it saves for
backward), one fake implementation and one autograd formula whose backward is the custom op
``deco_kernels::depthwise_conv2d_layernorm_backward``. The "torch" backend is
:func:`deco_kernels.reference.depthwise_conv2d_layernorm` with native autograd.
"""

from __future__ import annotations

import math

import torch

from deco_kernels import reference
from deco_kernels.backend import resolve_backend
from deco_kernels.ops import _common
from deco_kernels.ops._kernel_op import KernelOp

__all__ = ["depthwise_conv2d_layernorm"]

_OP = "depthwise_conv2d_layernorm"


def _depthwise_conv2d_layernorm_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: B x C x H x W -> (out B x H x W x C contiguous in x's dtype, mean and rstd B x H x W float32)."""
    fp32 = _common.parameter_as_fp32
    return _common.primitives(backend, "depthwise_conv2d_layernorm").depthwise_conv2d_layernorm_forward(
        x, fp32(weight), fp32(bias), fp32(norm_weight), fp32(norm_bias), eps
    )


def _depthwise_conv2d_layernorm_fake(x, weight, bias, norm_weight, norm_bias, eps, backend):
    batch, channels, height, width = x.shape
    return (
        _common.empty_output((batch, height, width, channels), x, memory_format=torch.contiguous_format),
        _common.empty_output((batch, height, width), x, dtype=torch.float32),
        _common.empty_output((batch, height, width), x, dtype=torch.float32),
    )


_depthwise_conv2d_layernorm_op = KernelOp(
    "deco_kernels::depthwise_conv2d_layernorm",
    _depthwise_conv2d_layernorm_impl,
    _depthwise_conv2d_layernorm_fake,
    native=True,
)


def _depthwise_conv2d_layernorm_backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    output_mask: list[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x like x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias float32); one not in
    ``output_mask`` is an empty tensor."""
    fp32 = _common.parameter_as_fp32
    grads = _common.primitives(backend, "depthwise_conv2d_layernorm").depthwise_conv2d_layernorm_backward(
        grad_out, x, fp32(weight), fp32(bias), fp32(norm_weight), mean, rstd, list(output_mask)
    )
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


def _depthwise_conv2d_layernorm_backward_fake(
    grad_out, x, weight, bias, norm_weight, mean, rstd, output_mask, backend
):
    need_x, need_weight, need_bias, need_norm_weight, need_norm_bias = output_mask
    channels = x.shape[1]
    # A separate empty tensor per skipped output: outputs must not alias each other.
    return (
        _common.empty_output(x.shape, x) if need_x else x.new_empty(0),
        weight.new_empty(weight.shape, dtype=torch.float32) if need_weight else x.new_empty(0),
        weight.new_empty((channels,), dtype=torch.float32) if need_bias else x.new_empty(0),
        weight.new_empty((channels,), dtype=torch.float32) if need_norm_weight else x.new_empty(0),
        weight.new_empty((channels,), dtype=torch.float32) if need_norm_bias else x.new_empty(0),
    )


_depthwise_conv2d_layernorm_backward_op = KernelOp(
    "deco_kernels::depthwise_conv2d_layernorm_backward",
    _depthwise_conv2d_layernorm_backward_impl,
    _depthwise_conv2d_layernorm_backward_fake,
)


def _setup_context(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, _, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, norm_weight, mean, rstd)
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.norm_bias_dtype = norm_bias.dtype


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, bias, norm_weight, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], ctx.has_bias and needs[2], needs[3], needs[4]]
    grads = _depthwise_conv2d_layernorm_backward_op(
        grad_out, x, weight, bias, norm_weight, mean, rstd, output_mask, ctx.backend
    )
    # Parameter gradients come back in each parameter's dtype; grad_x is already in x's.
    dtypes = (x.dtype, weight.dtype, bias.dtype if ctx.has_bias else None, norm_weight.dtype, ctx.norm_bias_dtype)
    return (
        *(grad.to(dtype) if needed else None for grad, dtype, needed in zip(grads, dtypes, output_mask)),
        None,
        None,
    )


_depthwise_conv2d_layernorm_op.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv2d_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the channels of a depthwise 'same' convolution (stride 1), channels-last out.

    ``F.layer_norm(F.conv2d(x, weight, bias, padding=(kh//2, kw//2), groups=C).permute(0, 2, 3, 1), (C,),
    norm_weight, norm_bias, eps)`` without writing the conv output.
    x: B x C x H x W with 1 <= C <= 2048, float32/float16/bfloat16, NCHW or channels-last (anything else is
    made contiguous in the format its strides suggest); weight: C x 1 x kh x kw with odd kh, kw in 1..31;
    bias: C or None; norm_weight, norm_bias: C. Parameters may be any floating dtype (math is fp32; their
    gradients come back in their dtype). Returns B x H x W x C contiguous, in x's dtype. ``backend``:
    "triton", "cuda", "torch" or None (the process-wide setting, see :mod:`deco_kernels.backend`).
    """
    _common.check_activation(x, "x", _OP)
    channels = x.shape[1]
    if not 1 <= channels <= _common.MAX_LAYERNORM_CHANNELS:
        raise ValueError(f"{_OP}: x must have 1..{_common.MAX_LAYERNORM_CHANNELS} channels (the LayerNorm "
                         f"runs over them in registers); got shape {tuple(x.shape)}")
    _common.check_depthwise_weight(weight, channels, x.device, _OP)
    _common.check_bias(bias, channels, x.device, _OP)
    _common.check_channel_parameter(norm_weight, "norm_weight", channels, x.device, _OP)
    _common.check_channel_parameter(norm_bias, "norm_bias", channels, x.device, _OP)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{_OP}: eps must be a finite number >= 0; got {eps!r}")
    backend = resolve_backend(x.device, backend, op=_OP)
    if backend == "torch":
        return reference.depthwise_conv2d_layernorm(x, weight, bias, norm_weight, norm_bias, eps)
    out, _, _ = _depthwise_conv2d_layernorm_op(
        _common.as_supported_layout(x), weight, bias, norm_weight, norm_bias, float(eps), backend
    )
    return out
