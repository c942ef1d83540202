"""Triton kernels for the CIM back end ``adaptive_max_pool2d(z + gamma * ffn)`` in one pass.

Layout: ``z`` and ``ffn`` are B x H x W x C tensors (channels innermost, as the CIM's Linear layers leave them),
``gamma`` is C. The pooled result is B x C x OH x OW in channels-last memory format, i.e. exactly
``F.adaptive_max_pool2d((z + gamma * ffn).permute(0, 3, 1, 2), output_size)`` -- but the full-resolution sum is
never written: the forward forms ``z + gamma * ffn`` in fp32 registers window by window and keeps the argmax
(flat ``h*W + w``, PyTorch's first-maximum / NaN rule).

Backward, from the saved argmax (and ffn at the argmax, saved by the forward so the full-resolution ffn need
not stay alive): ``grad_s`` (the gradient of the sum at each input pixel) is routed from the pooled windows,
exactly as in :mod:`deco_kernels.triton.adaptive_pool` (one lane per window; the first window that picked a
pixel writes it, the rest stays zero); ``grad_z = grad_s`` and ``grad_ffn = gamma * grad_s`` are written by the
same program. ``grad_gamma[c] = sum grad_y * ffn[argmax]`` is reduced on the pooled side (B*OH*OW terms per
channel): each program sums a fixed slice of positions for a block of channels into its own row of a partial-sum
buffer, and the rows are summed in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deco_kernels.ops._common import empty_output
from deco_kernels.triton import on_input_device
from deco_kernels.triton.adaptive_pool import (
    CONFIGS,
    ROUTE_CONFIGS,
    _block_elements,
    _check_index_range,
    _config,
    _grid,
    _max_pool_route,
    _max_span,
    _offset,
    _plane_offset,
    _window,
)

__all__ = ["aot_cases", "scale_residual_max_pool_backward", "scale_residual_max_pool_forward"]

# (BLOCK_P positions, BLOCK_C channels, num_warps) of the gamma-gradient reduction.
GAMMA_CONFIG = (32, 64, 4)
_POSITIONS_PER_SPLIT = 256
_MAX_SPLITS = 64


@triton.jit
def _scale_residual_max_pool_forward_kernel(
    z_ptr, ffn_ptr, gamma_ptr, y_ptr, indices_ptr, picked_ffn_ptr,
    total, C, H, W, OH, OW,
    z_stride_b, z_stride_h, z_stride_w, z_stride_c,
    f_stride_b, f_stride_h, f_stride_w, f_stride_c,
    y_stride_b, y_stride_c, y_stride_h, y_stride_w,
    max_window_h, max_window_w,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # Channels innermost: consecutive lanes read consecutive channels of z and ffn.
    _, valid, b, c, i, j = _block_elements(total, C, OH, OW, True, BLOCK)
    h_start, h_end = _window(i, H, OH)
    w_start, w_end = _window(j, W, OW)
    gamma = tl.load(gamma_ptr + c, mask=valid, other=0.0)
    z_pixel = z_ptr + _plane_offset(b, c, z_stride_b, z_stride_c)
    f_pixel = ffn_ptr + _plane_offset(b, c, f_stride_b, f_stride_c)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = h_start * W + w_start
    # An all -inf window reports its first element, like PyTorch, so that element's ffn feeds grad_gamma.
    best_ffn = tl.load(f_pixel + h_start.to(tl.int64) * f_stride_h + w_start.to(tl.int64) * f_stride_w,
                       mask=valid, other=0.0).to(tl.float32)
    for dh in range(0, max_window_h):
        h = h_start + dh
        row_ok = valid & (h < h_end)
        for dw in range(0, max_window_w):
            w = w_start + dw
            inside = row_ok & (w < w_end)
            z_value = tl.load(z_pixel + h.to(tl.int64) * z_stride_h + w.to(tl.int64) * z_stride_w, mask=inside)
            f_value = tl.load(f_pixel + h.to(tl.int64) * f_stride_h + w.to(tl.int64) * f_stride_w, mask=inside)
            value = z_value.to(tl.float32) + gamma * f_value.to(tl.float32)
            take = inside & ((value > best) | (value != value))
            best = tl.where(take, value, best)
            best_index = tl.where(take, h * W + w, best_index)
            best_ffn = tl.where(take, f_value.to(tl.float32), best_ffn)
    y_offset = _offset(b, c, i, j, y_stride_b, y_stride_c, y_stride_h, y_stride_w)
    tl.store(y_ptr + y_offset, best.to(y_ptr.dtype.element_ty), mask=valid)
    tl.store(indices_ptr + y_offset, best_index.to(tl.int64), mask=valid)
    tl.store(picked_ffn_ptr + y_offset, best_ffn.to(picked_ffn_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _scale_residual_max_pool_backward_kernel(
    grad_y_ptr, indices_ptr, gamma_ptr, grad_z_ptr, grad_ffn_ptr,
    total, C, H, W, OH, OW,
    g_stride_b, g_stride_c, g_stride_h, g_stride_w,
    i_stride_b, i_stride_c, i_stride_h, i_stride_w,
    max_windows_h, max_windows_w,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # One lane per pooled window (``total`` of them, channels fastest), on zero-filled grad_z and grad_ffn.
    _, valid, b, c, i, j = _block_elements(total, C, OH, OW, True, BLOCK)
    writes, picked, grad_sum = _max_pool_route(
        grad_y_ptr, indices_ptr, b, c, i, j, valid,
        H, W, OH, OW,
        g_stride_b, g_stride_c, g_stride_h, g_stride_w,
        i_stride_b, i_stride_c, i_stride_h, i_stride_w,
        max_windows_h, max_windows_w,
        BLOCK,
    )  # fmt: skip
    gamma = tl.load(gamma_ptr + c, mask=writes, other=0.0)
    # grad_z and grad_ffn are dense B x H x W x C; picked = h * W + w.
    offset = (b.to(tl.int64) * H * W + picked) * C + c
    tl.store(grad_z_ptr + offset, grad_sum.to(grad_z_ptr.dtype.element_ty), mask=writes)
    tl.store(grad_ffn_ptr + offset, (gamma * grad_sum).to(grad_ffn_ptr.dtype.element_ty), mask=writes)


@triton.jit
def _scale_residual_max_pool_grad_gamma_kernel(
    grad_y_ptr, picked_ffn_ptr, partial_ptr,
    positions, positions_per_split, C, OH, OW,
    g_stride_b, g_stride_c, g_stride_h, g_stride_w,
    p_stride_b, p_stride_c, p_stride_h, p_stride_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # partial[split, c] = sum over this split's pooled positions (b, i, j) of grad_y * (ffn at the argmax).
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    channel_ok = channels < C
    c64 = channels.to(tl.int64)
    first = split * positions_per_split
    last = tl.minimum(first + positions_per_split, positions)
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for start in range(first, last, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        j = (p % OW).to(tl.int64)
        i = ((p // OW) % OH).to(tl.int64)
        b = (p // (OW * OH)).to(tl.int64)
        ok = (p < last)[:, None] & channel_ok[None, :]
        g_offset = (b * g_stride_b + i * g_stride_h + j * g_stride_w)[:, None] + c64[None, :] * g_stride_c
        p_offset = (b * p_stride_b + i * p_stride_h + j * p_stride_w)[:, None] + c64[None, :] * p_stride_c
        grad = tl.load(grad_y_ptr + g_offset, mask=ok, other=0.0).to(tl.float32)
        picked = tl.load(picked_ffn_ptr + p_offset, mask=ok, other=0.0).to(tl.float32)
        acc += grad * picked
    tl.store(partial_ptr + split.to(tl.int64) * C + c64, tl.sum(acc, axis=0), mask=channel_ok)


@on_input_device
def scale_residual_max_pool_forward(
    z: torch.Tensor, ffn: torch.Tensor, gamma: torch.Tensor, output_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max pool of ``z + gamma * ffn`` with argmax.

    z, ffn: B x H x W x C (same dtype, fp32/fp16/bf16, any strides); gamma: C float32; output_size: (OH, OW).
    Returns ``y`` (B x C x OH x OW, z's dtype), ``indices`` (int64, flat ``h*W + w``) and ``picked_ffn``
    (``ffn`` at each argmax, ffn's dtype: all the gamma gradient needs, so the full-resolution ffn need not be
    kept for backward), all channels-last.
    """
    batch, height, width, channels = z.shape
    out_h, out_w = output_size
    y = empty_output((batch, channels, out_h, out_w), z, memory_format=torch.channels_last)
    indices = empty_output(y.shape, z, dtype=torch.int64, memory_format=torch.channels_last)
    picked_ffn = empty_output(y.shape, ffn, memory_format=torch.channels_last)
    total = y.numel()
    if total == 0:
        return y, indices, picked_ffn
    _check_index_range({"z": z, "the output": y}, (height, width), (out_h, out_w))
    block, num_warps = _config(total)
    _scale_residual_max_pool_forward_kernel[_grid(total, block)](
        z, ffn, gamma, y, indices, picked_ffn,
        total, channels, height, width, out_h, out_w,
        *z.stride(), *ffn.stride(), *y.stride(),
        _max_span(height, out_h), _max_span(width, out_w),
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return y, indices, picked_ffn


@on_input_device
def scale_residual_max_pool_backward(
    grad_y: torch.Tensor,
    gamma: torch.Tensor,
    indices: torch.Tensor,
    picked_ffn: torch.Tensor,
    input_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`scale_residual_max_pool_forward`.

    grad_y, indices, picked_ffn: B x C x OH x OW (any strides); gamma: C float32; input_size: (H, W).
    Returns ``grad_z`` and ``grad_ffn`` (B x H x W x C contiguous, in grad_y's dtype) and ``grad_gamma``
    (C, float32).
    """
    batch, channels, out_h, out_w = grad_y.shape
    height, width = input_size
    shape = (batch, height, width, channels)
    grad_z = empty_output(shape, grad_y, memory_format=torch.contiguous_format)
    grad_ffn = empty_output(shape, grad_y, memory_format=torch.contiguous_format)
    if grad_z.numel() == 0:
        return grad_z, grad_ffn, torch.zeros(channels, dtype=torch.float32, device=grad_y.device)
    _check_index_range({"grad_z": grad_z, "grad_y": grad_y}, (height, width), (out_h, out_w))
    # The routing writes only the inputs some window picked.
    grad_z.zero_()
    grad_ffn.zero_()
    block, num_warps = _config(grad_y.numel(), ROUTE_CONFIGS)
    _scale_residual_max_pool_backward_kernel[_grid(grad_y.numel(), block)](
        grad_y, indices, gamma, grad_z, grad_ffn,
        grad_y.numel(), channels, height, width, out_h, out_w,
        *grad_y.stride(), *indices.stride(),
        _max_span(out_h, height), _max_span(out_w, width),
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip

    positions = batch * out_h * out_w
    splits = min(triton.cdiv(positions, _POSITIONS_PER_SPLIT), _MAX_SPLITS)
    positions_per_split = triton.cdiv(positions, splits)
    partial = empty_output((splits, channels), grad_y, dtype=torch.float32)
    block_p, block_c, gamma_warps = GAMMA_CONFIG
    _scale_residual_max_pool_grad_gamma_kernel[(triton.cdiv(channels, block_c), splits)](
        grad_y, picked_ffn, partial,
        positions, positions_per_split, channels, out_h, out_w,
        *grad_y.stride(), *picked_ffn.stride(),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=gamma_warps,
    )  # fmt: skip
    return grad_z, grad_ffn, partial.sum(dim=0)


def aot_cases() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every kernel at every config, fp32 and bf16: ``(name, jit_fn, signature, constexprs, num_warps)``.

    ``signature`` lists every parameter in order, the constexpr ones as ``"constexpr"``.
    """

    def ints(*names: str) -> dict[str, str]:
        return {name: "i32" for name in names}

    def strides(prefix: str, dims: str) -> tuple[str, ...]:
        return tuple(f"{prefix}_stride_{dim}" for dim in dims)

    sizes = ("total", "C", "H", "W", "OH", "OW")
    cases = []
    for dtype in ("fp32", "bf16"):
        value = f"*{dtype}"
        forward = {
            "z_ptr": value, "ffn_ptr": value, "gamma_ptr": "*fp32", "y_ptr": value, "indices_ptr": "*i64",
            "picked_ffn_ptr": value,
        }  # fmt: skip
        forward |= ints(*sizes, *strides("z", "bhwc"), *strides("f", "bhwc"), *strides("y", "bchw"))
        forward |= ints("max_window_h", "max_window_w") | {"BLOCK": "constexpr"}
        backward = {
            "grad_y_ptr": value, "indices_ptr": "*i64", "gamma_ptr": "*fp32", "grad_z_ptr": value, "grad_ffn_ptr": value
        }  # fmt: skip
        backward |= ints(*sizes, *strides("g", "bchw"), *strides("i", "bchw"), "max_windows_h", "max_windows_w")
        backward |= {"BLOCK": "constexpr"}
        for name, fn, signature, configs in (
            ("scale_residual_max_pool_forward", _scale_residual_max_pool_forward_kernel, forward, CONFIGS),
            ("scale_residual_max_pool_backward", _scale_residual_max_pool_backward_kernel, backward, ROUTE_CONFIGS),
        ):
            for block, num_warps in configs:
                cases.append((f"{name}_{dtype}_b{block}_w{num_warps}", fn, signature, {"BLOCK": block}, num_warps))
        grad_gamma = {"grad_y_ptr": value, "picked_ffn_ptr": value, "partial_ptr": "*fp32"}
        grad_gamma |= ints("positions", "positions_per_split", "C", "OH", "OW")
        grad_gamma |= ints(*strides("g", "bchw"), *strides("p", "bchw"))
        grad_gamma |= {"BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}
        block_p, block_c, num_warps = GAMMA_CONFIG
        cases.append((
            f"scale_residual_max_pool_grad_gamma_{dtype}_p{block_p}_c{block_c}_w{num_warps}",
            _scale_residual_max_pool_grad_gamma_kernel, grad_gamma, {"BLOCK_P": block_p, "BLOCK_C": block_c},
            num_warps,
        ))  # fmt: skip
    return cases
