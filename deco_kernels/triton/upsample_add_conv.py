"""Triton CIM front ``y = dwconv(u + memory) + u`` with ``u = nearest_upsample(query, memory's H x W)``.

Neither ``u`` nor ``u + memory`` is ever written to global memory: the depthwise kernels of
:mod:`deco_kernels.triton.depthwise_conv2d` run with ``UPSAMPLE``, reading the query through PyTorch's nearest
rule ``src = min(floor(dst * float(in / out)), in - 1)`` (fp32 scale, as ATen computes it) wherever they
need the conv input.

Backward, with s = u + memory:
- grad_memory = grad_s = conv-transpose(grad_y) (the forward kernel with the rotated kernel);
- grad_query[qh, qw] = sum of (grad_s + grad_y) over the memory pixels whose nearest source is (qh, qw): a
  gather over each query cell's footprint, so no atomics and a fixed summation order;
- grad_weight, grad_bias: the deterministic per-tile partial sums with s recomputed from query and memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deco_kernels.ops import _common
from deco_kernels.triton import on_input_device
from deco_kernels.triton.depthwise_conv2d import (
    TILES,
    _nearest_source,
    _tile_ranges,
    aot_signature,
    check_parameters,
    conv_aot_cases,
    launch_conv_forward,
    launch_weight_grad,
    tile_config,
    tile_grid,
    nearest_scale,
    unit_strides,
)

__all__ = [
    "aot_cases",
    "upsample_add_conv_backward",
    "upsample_add_conv_forward",
]


@triton.jit
def _upsample_grad_kernel(
    gs_ptr, gy_ptr, gq_ptr,
    C, H, W, Hq, Wq, scale_h, scale_w,
    ss_b, ss_c, ss_h, ss_w,
    sg_b, sg_c, sg_h, sg_w,
    sq_b, sq_c, sq_h, sq_w,
    n_c_blocks, n_h_blocks, n_w_blocks, foot_h, foot_w,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """grad_query[qh, qw] = sum over {(h, w): src(h) == qh, src(w) == qw} of grad_s[h, w] + grad_y[h, w].

    One program per tile of query cells. The footprint of row qh starts at ceil(qh * H / Hq) up to one row
    of fp32 rounding either way, so ``foot_h`` = ceil(H / Hq) + 2 candidate rows from one before it cover it;
    each candidate is kept only if the nearest rule maps it to qh (the same rule as the forward).
    """
    b, cs, qhs, qws = _tile_ranges(n_c_blocks, n_h_blocks, n_w_blocks, BLOCK_C, BLOCK_H, BLOCK_W)
    c_ok = cs[:, None, None] < C
    h_first = (qhs * H + Hq - 1) // Hq - 1
    w_first = (qws * W + Wq - 1) // Wq - 1
    gs_channels = gs_ptr + b * ss_b + cs[:, None, None] * ss_c
    gy_channels = gy_ptr + b * sg_b + cs[:, None, None] * sg_c

    acc = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W), dtype=tl.float32)
    for dh in range(foot_h):
        hh = h_first + dh
        h_in = (hh >= 0) & (hh < H) & (_nearest_source(hh, scale_h, Hq) == qhs)
        row_ok = c_ok & h_in[None, :, None]
        gs_rows = gs_channels + hh[None, :, None] * ss_h
        gy_rows = gy_channels + hh[None, :, None] * sg_h
        for dw in range(foot_w):
            ww = w_first + dw
            w_in = (ww >= 0) & (ww < W) & (_nearest_source(ww, scale_w, Wq) == qws)
            mask = row_ok & w_in[None, None, :]
            acc += tl.load(gs_rows + ww[None, None, :] * ss_w, mask=mask, other=0.0).to(tl.float32)
            acc += tl.load(gy_rows + ww[None, None, :] * sg_w, mask=mask, other=0.0).to(tl.float32)

    out_mask = c_ok & (qhs < Hq)[None, :, None] & (qws < Wq)[None, None, :]
    q_offsets = cs[:, None, None] * sq_c + qhs[None, :, None] * sq_h + qws[None, None, :] * sq_w
    tl.store(gq_ptr + b * sq_b + q_offsets, acc.to(gq_ptr.dtype.element_ty), mask=out_mask)


def _check_pair(query: torch.Tensor, memory: torch.Tensor, op: str) -> None:
    if query.shape[:2] != memory.shape[:2]:
        raise ValueError(
            f"{op}: query and memory must have the same batch and channels; got {tuple(query.shape)} "
            f"and {tuple(memory.shape)}"
        )


@on_input_device
def upsample_add_conv_forward(
    query: torch.Tensor, memory: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = dwconv(u + memory, weight, bias) + u, u = F.interpolate(query, size=memory's H x W) (nearest).

    query: B x C x Hq x Wq; memory: B x C x H x W (same dtype, NCHW or channels-last each); weight:
    C x 1 x kh x kw fp32; bias: C fp32 or None. Returns y: B x C x H x W in memory's dtype and memory format.
    """
    _check_pair(query, memory, "upsample_add_conv_forward")
    check_parameters(weight, bias, memory.shape[1], "upsample_add_conv_forward")
    y = _common.empty_output(memory.shape, memory)
    if y.numel():
        launch_conv_forward(query, memory, weight, bias, y, flip=False)
    return y


@on_input_device
def upsample_add_conv_backward(
    grad_y: torch.Tensor, query: torch.Tensor, memory: torch.Tensor, weight: torch.Tensor, output_mask: list[bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_query like query, grad_memory like memory, grad_weight C x 1 x kh x kw fp32, grad_bias C fp32).

    grad_y: B x C x H x W; output_mask: which of the four to compute (the others are None).
    """
    _check_pair(query, memory, "upsample_add_conv_backward")
    kh, kw = check_parameters(weight, None, memory.shape[1], "upsample_add_conv_backward")
    need_query, need_memory, need_weight, need_bias = output_mask
    grad_query = grad_memory = None
    if need_query or need_memory:
        grad_memory = _common.empty_output(memory.shape, memory)
        if grad_memory.numel():
            launch_conv_forward(grad_y, None, weight, None, grad_memory, flip=True)
    if need_query:
        grad_query = _common.empty_output(query.shape, query)
        if grad_query.numel():
            if grad_memory.numel():
                _launch_upsample_grad(grad_memory, grad_y, grad_query)
            else:
                grad_query.zero_()  # an empty memory map receives nothing from the query
    grad_weight, grad_bias = launch_weight_grad(grad_y, query, memory, (kh, kw), need_weight, need_bias)
    return grad_query, grad_memory if need_memory else None, grad_weight, grad_bias


def _launch_upsample_grad(grad_s: torch.Tensor, grad_y: torch.Tensor, grad_query: torch.Tensor) -> None:
    batch, _, height, width = grad_s.shape
    query_h, query_w = grad_query.shape[-2:]
    tile = tile_config(grad_query)
    n_c, n_h, n_w = tile_grid(grad_query.shape, tile)
    _upsample_grad_kernel[(batch * n_c * n_h * n_w,)](
        grad_s, grad_y, grad_query,
        grad_query.shape[1], height, width, query_h, query_w,
        nearest_scale(query_h, height), nearest_scale(query_w, width),
        *grad_s.stride(), *grad_y.stride(), *grad_query.stride(),
        n_c, n_h, n_w, triton.cdiv(height, query_h) + 2, triton.cdiv(width, query_w) + 2,
        BLOCK_C=tile.block_c, BLOCK_H=tile.block_h, BLOCK_W=tile.block_w, num_warps=tile.num_warps,
    )


def aot_cases() -> list[tuple[str, object, dict, dict, int]]:
    """Every kernel of this module at every tuning configuration, for the ahead-of-time compile test."""
    cases = conv_aot_cases(upsample=True, prefix="upsample_add_conv", kernel_size=9)
    for index, tile in enumerate(TILES):
        dtype = ("fp32", "bf16", "fp16")[index % 3]
        constexprs = {"BLOCK_C": tile.block_c, "BLOCK_H": tile.block_h, "BLOCK_W": tile.block_w,
                      **unit_strides(tile, ("ss", "sg", "sq"))}
        pointers = {"gs_ptr": f"*{dtype}", "gy_ptr": f"*{dtype}", "gq_ptr": f"*{dtype}"}
        cases.append((f"upsample_add_conv_grad_query_{tile.name}_{dtype}", _upsample_grad_kernel,
                      aot_signature(_upsample_grad_kernel, pointers, constexprs), constexprs, tile.num_warps))
    return cases
