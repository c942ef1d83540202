"""``deco_kernels.upsample_add_conv``: DECO's CIM front ``dwconv(u + memory) + u``, u the nearest-upsampled query.

One torch.library custom op ``deco_kernels::upsample_add_conv`` for the "triton" and "cuda" backends (the
backend name is an argument), with a fake implementation and an autograd formula whose backward is the custom
op ``deco_kernels::upsample_add_conv_backward``. The "torch" backend is
:func:`deco_kernels.reference.upsample_add_conv` with native autograd.
"""

from __future__ import annotations

import torch

from deco_kernels import reference
from deco_kernels.backend import resolve_backend
from deco_kernels.ops import _common
from deco_kernels.ops._kernel_op import KernelOp

__all__ = ["upsample_add_conv"]

_OP = "upsample_add_conv"


def _upsample_add_conv_impl(
    query: torch.Tensor, memory: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str
) -> torch.Tensor:
    return _common.primitives(backend, "upsample_add_conv").upsample_add_conv_forward(
        query, memory, _common.parameter_as_fp32(weight), _common.parameter_as_fp32(bias)
    )


def _upsample_add_conv_fake(query, memory, weight, bias, backend):
    return _common.empty_output(memory.shape, memory)


_upsample_add_conv_op = KernelOp(
    "deco_kernels::upsample_add_conv", _upsample_add_conv_impl, _upsample_add_conv_fake, native=True
)


def _upsample_add_conv_backward_impl(
    grad_y: torch.Tensor,
    query: torch.Tensor,
    memory: torch.Tensor,
    weight: torch.Tensor,
    output_mask: list[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_query, grad_memory, grad_weight fp32, grad_bias fp32); one not in ``output_mask`` is empty."""
    grads = _common.primitives(backend, "upsample_add_conv").upsample_add_conv_backward(
        grad_y, query, memory, _common.parameter_as_fp32(weight), list(output_mask)
    )
    return tuple(memory.new_empty(0) if grad is None else grad for grad in grads)


def _upsample_add_conv_backward_fake(grad_y, query, memory, weight, output_mask, backend):
    need_query, need_memory, need_weight, need_bias = output_mask
    empty = memory.new_empty(0)
    return (
        _common.empty_output(query.shape, query) if need_query else empty,
        _common.empty_output(memory.shape, memory) if need_memory else empty,
        weight.new_empty(weight.shape, dtype=torch.float32) if need_weight else empty,
        weight.new_empty((memory.shape[1],), dtype=torch.float32) if need_bias else empty,
    )


_upsample_add_conv_backward_op = KernelOp(
    "deco_kernels::upsample_add_conv_backward", _upsample_add_conv_backward_impl, _upsample_add_conv_backward_fake
)


def _setup_context(ctx, inputs, output):
    query, memory, weight, bias, backend = inputs
    ctx.save_for_backward(query, memory, weight)
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y):
    query, memory, weight = ctx.saved_tensors
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                   ctx.bias_dtype is not None and ctx.needs_input_grad[3]]
    # The gradient of e.g. .sum() arrives expanded (stride 0); the primitives take dense NCHW/channels-last.
    grad_y = _common.as_supported_layout(grad_y)
    grad_query, grad_memory, grad_weight, grad_bias = _upsample_add_conv_backward_op(
        grad_y, query, memory, weight, output_mask, ctx.backend
    )
    return (
        grad_query if output_mask[0] else None,
        grad_memory if output_mask[1] else None,
        grad_weight.to(weight.dtype) if output_mask[2] else None,
        grad_bias.to(ctx.bias_dtype) if output_mask[3] else None,
        None,
    )


_upsample_add_conv_op.register_autograd(_backward, setup_context=_setup_context)


def upsample_add_conv(
    query: torch.Tensor,
    memory: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``dwconv(u + memory, weight, bias) + u`` with ``u = F.interpolate(query, size=memory's H x W)`` (nearest).

    query: B x C x Hq x Wq (any Hq, Wq >= 1: up- or downsampled to H x W); memory: B x C x H x W with the
    query's B, C, dtype (float32/float16/bfloat16) and device; weight: C x 1 x kh x kw with odd kh, kw in
    1..31; bias: C or None. Returns B x C x H x W in memory's dtype and memory format. ``backend``: "triton",
    "cuda", "torch" or None (the process-wide setting, see :mod:`deco_kernels.backend`).
    """
    _common.check_activation(query, "query", _OP)
    _common.check_activation(memory, "memory", _OP)
    _common.check_same_device(memory, "memory", query, "query", _OP)
    _common.check_same_dtype(memory, "memory", query, "query", _OP)
    if query.shape[:2] != memory.shape[:2]:
        raise ValueError(
            f"{_OP}: query and memory must have the same batch size and channels; got query "
            f"{tuple(query.shape)} and memory {tuple(memory.shape)}"
        )
    _common.check_depthwise_weight(weight, memory.shape[1], memory.device, _OP)
    _common.check_bias(bias, memory.shape[1], memory.device, _OP)
    backend = resolve_backend(memory.device, backend, op=_OP)
    if backend == "torch":
        return reference.upsample_add_conv(query, memory, weight, bias)
    return _upsample_add_conv_op(
        _common.as_supported_layout(query), _common.as_supported_layout(memory), weight, bias, backend
    )
