"""Triton kernels for adaptive max / average pooling over the H x W plane, forward and backward.

Window rule (PyTorch's): output row ``i`` of ``OH`` covers input rows ``[floor(i*H/OH), ceil((i+1)*H/OH))``,
likewise for columns. Windows overlap when ``H`` is not a multiple of ``OH`` (DECO pools 25 x 42 to 10 x 10),
and an input row belongs to output rows ``[floor(h*OH/H), ceil((h+1)*OH/H))`` -- the same rule with the roles
of input and output swapped. The average backward uses that second range: every input pixel gathers from the
few windows that contain it. The max backward runs one lane per window on a zero-filled gradient: the first
window (row-major) among those that picked an input sums their gradients in that order and writes it, so each
element is written by one program (no atomics, deterministic) and only pooled elements are visited.

Every kernel walks a flat block of elements of its *output* (``y`` forward, ``grad_x`` backward; for the max
backward, the pooled windows in ``grad_x``'s order) in that tensor's memory order (W fastest for NCHW, C fastest
for channels-last, so stores and the matching loads are contiguous) and reads every tensor through its strides,
so any strides work, including the stride-0 expanded gradient of ``.sum()``. Values are loaded in their storage
dtype (fp32/fp16/bf16) and combined in fp32.

The launchers are the backend primitives of :mod:`deco_kernels.ops.adaptive_pool` (no autograd here).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deco_kernels.ops._common import empty_output, memory_format_of
from deco_kernels.triton import on_input_device

__all__ = [
    "adaptive_avg_pool2d_backward",
    "adaptive_avg_pool2d_forward",
    "adaptive_max_pool2d_backward",
    "adaptive_max_pool2d_forward",
    "aot_cases",
]

# (BLOCK, num_warps): the small block keeps enough programs in flight for DECO's 480 x 10 x 10 outputs, the
# large one cuts the program count for big maps (DECO+ at stride 8, large batches).
CONFIGS = ((256, 4), (512, 8))
# The max backward's lanes are pooled windows, one per thread: its routing loop holds int64 indices and plane
# pointers per lane, which spilled at two lanes per thread (sm_90a, the CIM back end).
ROUTE_CONFIGS = ((128, 4), (256, 8))
_LARGE_CONFIG_FROM = 1 << 16

_INDEX_LIMIT = 2**31  # flat element numbers are 32-bit inside the kernels; memory offsets are 64-bit


@triton.jit
def _unflatten(offs, C, H, W, CHANNELS_LAST: tl.constexpr):
    """(b, c, h, w) of flat element numbers in NCHW or channels-last (NHWC) order of a B x C x H x W tensor."""
    if CHANNELS_LAST:
        c = offs % C
        rest = offs // C
        w = rest % W
        rest = rest // W
        h = rest % H
        b = rest // H
    else:
        w = offs % W
        rest = offs // W
        h = rest % H
        rest = rest // H
        c = rest % C
        b = rest // C
    return b, c, h, w


@triton.jit
def _block_elements(total, C, H, W, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK flat element numbers of a B x C x H x W tensor (in CHANNELS_LAST or NCHW order),
    whether each is < total, and their (b, c, h, w)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b, c, h, w = _unflatten(offs, C, H, W, CHANNELS_LAST)
    return offs, offs < total, b, c, h, w


@triton.jit
def _window(i, in_size, out_size):
    """``[floor(i*in/out), ceil((i+1)*in/out))``: the input rows (or columns) that output row ``i`` pools.

    With the roles swapped, ``_window(h, OH, H)`` is the range of output rows whose windows contain input row h.
    """
    start = (i * in_size) // out_size
    end = ((i + 1) * in_size + out_size - 1) // out_size
    return start, end


@triton.jit
def _plane_offset(b, c, stride_b, stride_c):
    """64-bit memory offset of plane (b, c) of a strided 4-D tensor."""
    return b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c


@triton.jit
def _offset(b, c, h, w, stride_b, stride_c, stride_h, stride_w):
    """64-bit memory offset of element (b, c, h, w) of a strided 4-D tensor."""
    return _plane_offset(b, c, stride_b, stride_c) + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w


@triton.jit
def _max_pool_route(
    grad_y_ptr, indices_ptr, b, c, i, j, valid,
    H, W, OH, OW,
    g_stride_b, g_stride_c, g_stride_h, g_stride_w,
    i_stride_b, i_stride_c, i_stride_h, i_stride_w,
    max_windows_h, max_windows_w,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Where window (b, c, i, j) routes its gradient: ``(writes, picked, total)``.

    The window's argmax (flat ``picked = h*W + w``) gets the fp32 sum of ``grad_y`` over every window whose
    argmax it is, added in row-major window order; ``writes`` is True only for the first of those windows, so
    exactly one program writes each picked input. An index outside its own window (only through the raw op)
    writes nothing.
    """
    # Offsets within a plane are 32-bit: grad_y and indices have fewer than 2**31 elements (_check_index_range).
    g_plane = grad_y_ptr + _plane_offset(b, c, g_stride_b, g_stride_c)
    i_plane = indices_ptr + _plane_offset(b, c, i_stride_b, i_stride_c)
    picked = tl.load(i_plane + i * i_stride_h + j * i_stride_w, mask=valid, other=-1)
    writes = valid & (picked >= 0) & (picked < H * W)
    safe = tl.where(writes, picked, 0)
    i_start, i_end = _window((safe // W).to(tl.int32), OH, H)
    j_start, j_end = _window((safe % W).to(tl.int32), OW, W)
    writes = writes & (i >= i_start) & (i < i_end) & (j >= j_start) & (j < j_end)
    total = tl.zeros([BLOCK], tl.float32)
    for di in range(0, max_windows_h):
        wi = i_start + di
        row_ok = writes & (wi < i_end)
        for dj in range(0, max_windows_w):
            wj = j_start + dj
            inside = row_ok & (wj < j_end)
            chosen = tl.load(i_plane + wi * i_stride_h + wj * i_stride_w, mask=inside, other=-1)
            match = inside & (chosen == picked)
            # An earlier window that picked the same input writes it.
            writes = writes & ~(match & ((wi < i) | ((wi == i) & (wj < j))))
            grad = tl.load(g_plane + wi * g_stride_h + wj * g_stride_w, mask=match, other=0.0)
            total += grad.to(tl.float32)
    return writes, picked, total


@triton.jit
def _adaptive_max_pool2d_forward_kernel(
    x_ptr, y_ptr, indices_ptr,
    total, C, H, W, OH, OW,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    y_stride_b, y_stride_c, y_stride_h, y_stride_w,
    max_window_h, max_window_w,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _, valid, b, c, i, j = _block_elements(total, C, OH, OW, CHANNELS_LAST, BLOCK)
    h_start, h_end = _window(i, H, OH)
    w_start, w_end = _window(j, W, OW)
    x_plane = x_ptr + _plane_offset(b, c, x_stride_b, x_stride_c)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    # An all -inf window reports its first element, like PyTorch.
    best_index = h_start * W + w_start
    for dh in range(0, max_window_h):
        h = h_start + dh
        row_ok = valid & (h < h_end)
        row = x_plane + h.to(tl.int64) * x_stride_h
        for dw in range(0, max_window_w):
            w = w_start + dw
            inside = row_ok & (w < w_end)
            value = tl.load(row + w.to(tl.int64) * x_stride_w, mask=inside, other=float("-inf")).to(tl.float32)
            # Row-major scan with a strict '>' keeps the first maximum; a NaN always takes over (so the last
            # NaN wins), exactly PyTorch's `val > max || isnan(val)`.
            take = inside & ((value > best) | (value != value))
            best = tl.where(take, value, best)
            best_index = tl.where(take, h * W + w, best_index)
    y_offset = _offset(b, c, i, j, y_stride_b, y_stride_c, y_stride_h, y_stride_w)
    tl.store(y_ptr + y_offset, best.to(y_ptr.dtype.element_ty), mask=valid)
    tl.store(indices_ptr + y_offset, best_index.to(tl.int64), mask=valid)


@triton.jit
def _adaptive_max_pool2d_backward_kernel(
    grad_y_ptr, indices_ptr, grad_x_ptr,
    total, C, H, W, OH, OW,
    g_stride_b, g_stride_c, g_stride_h, g_stride_w,
    i_stride_b, i_stride_c, i_stride_h, i_stride_w,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    max_windows_h, max_windows_w,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One lane per pooled window (``total`` of them), on a zero-filled grad_x.
    _, valid, b, c, i, j = _block_elements(total, C, OH, OW, CHANNELS_LAST, BLOCK)
    writes, picked, routed = _max_pool_route(
        grad_y_ptr, indices_ptr, b, c, i, j, valid,
        H, W, OH, OW,
        g_stride_b, g_stride_c, g_stride_h, g_stride_w,
        i_stride_b, i_stride_c, i_stride_h, i_stride_w,
        max_windows_h, max_windows_w,
        BLOCK,
    )  # fmt: skip
    picked = tl.where(writes, picked, 0)
    x_offset = _offset(b, c, picked // W, picked % W, x_stride_b, x_stride_c, x_stride_h, x_stride_w)
    tl.store(grad_x_ptr + x_offset, routed.to(grad_x_ptr.dtype.element_ty), mask=writes)


@triton.jit
def _adaptive_avg_pool2d_forward_kernel(
    x_ptr, y_ptr,
    total, C, H, W, OH, OW,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    y_stride_b, y_stride_c, y_stride_h, y_stride_w,
    max_window_h, max_window_w,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _, valid, b, c, i, j = _block_elements(total, C, OH, OW, CHANNELS_LAST, BLOCK)
    h_start, h_end = _window(i, H, OH)
    w_start, w_end = _window(j, W, OW)
    x_plane = x_ptr + _plane_offset(b, c, x_stride_b, x_stride_c)
    acc = tl.zeros([BLOCK], tl.float32)
    for dh in range(0, max_window_h):
        h = h_start + dh
        row_ok = valid & (h < h_end)
        row = x_plane + h.to(tl.int64) * x_stride_h
        for dw in range(0, max_window_w):
            w = w_start + dw
            inside = row_ok & (w < w_end)
            acc += tl.load(row + w.to(tl.int64) * x_stride_w, mask=inside, other=0.0).to(tl.float32)
    area = ((h_end - h_start) * (w_end - w_start)).to(tl.float32)
    y_offset = _offset(b, c, i, j, y_stride_b, y_stride_c, y_stride_h, y_stride_w)
    tl.store(y_ptr + y_offset, (acc / area).to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _adaptive_avg_pool2d_backward_kernel(
    grad_y_ptr, grad_x_ptr,
    total, C, H, W, OH, OW,
    g_stride_b, g_stride_c, g_stride_h, g_stride_w,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    max_windows_h, max_windows_w,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _, valid, b, c, h, w = _block_elements(total, C, H, W, CHANNELS_LAST, BLOCK)
    i_start, i_end = _window(h, OH, H)
    j_start, j_end = _window(w, OW, W)
    g_plane = grad_y_ptr + _plane_offset(b, c, g_stride_b, g_stride_c)
    acc = tl.zeros([BLOCK], tl.float32)
    for di in range(0, max_windows_h):
        i = i_start + di
        row_ok = valid & (i < i_end)
        window_h_start, window_h_end = _window(i, H, OH)
        for dj in range(0, max_windows_w):
            j = j_start + dj
            inside = row_ok & (j < j_end)
            window_w_start, window_w_end = _window(j, W, OW)
            grad = tl.load(
                g_plane + i.to(tl.int64) * g_stride_h + j.to(tl.int64) * g_stride_w, mask=inside, other=0.0
            ).to(tl.float32)
            acc += grad / ((window_h_end - window_h_start) * (window_w_end - window_w_start)).to(tl.float32)
    x_offset = _offset(b, c, h, w, x_stride_b, x_stride_c, x_stride_h, x_stride_w)
    tl.store(grad_x_ptr + x_offset, acc.to(grad_x_ptr.dtype.element_ty), mask=valid)


@functools.lru_cache(maxsize=256)
def _max_span(in_size: int, out_size: int) -> int:
    """The largest ``ceil((i+1)*in/out) - floor(i*in/out)`` over ``i < out``: the longest window along a dim.

    With ``(in, out) = (OH, H)`` it is instead the most output windows that share one input row.
    """
    return max(-((-(i + 1) * in_size) // out_size) - (i * in_size) // out_size for i in range(out_size))


def _config(total: int, configs: tuple[tuple[int, int], ...] = CONFIGS) -> tuple[int, int]:
    return configs[1] if total >= _LARGE_CONFIG_FROM else configs[0]


def _grid(total: int, block: int) -> tuple[int]:
    return (triton.cdiv(total, block),)


def _check_index_range(
    tensors: dict[str, torch.Tensor], input_size: tuple[int, int], output_size: tuple[int, int]
) -> None:
    """Element numbers and the window products ``H*OH``, ``W*OW`` must fit the kernels' 32-bit index math."""
    for name, t in tensors.items():
        if t.numel() >= _INDEX_LIMIT:
            raise ValueError(f"{name} has {t.numel()} elements; the Triton pooling kernels take fewer than 2**31")
    for size, out, dim in zip(input_size, output_size, "HW"):
        if (size + 1) * out >= _INDEX_LIMIT:
            raise ValueError(f"input {dim}={size} with output {dim}={out} is too large for 32-bit window indices")


@on_input_device
def adaptive_max_pool2d_forward(
    x: torch.Tensor, output_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive max pooling with argmax.

    x: B x C x H x W (fp32/fp16/bf16, any strides); output_size: (OH, OW). Returns ``y`` (B x C x OH x OW,
    x's dtype) and ``indices`` (int64, flat ``h*W + w`` within the plane), both in x's memory format.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = output_size
    y = empty_output((batch, channels, out_h, out_w), x)
    indices = empty_output(y.shape, x, dtype=torch.int64)
    total = y.numel()
    if total == 0:
        return y, indices
    _check_index_range({"x": x, "the output": y}, (height, width), (out_h, out_w))
    block, num_warps = _config(total)
    _adaptive_max_pool2d_forward_kernel[_grid(total, block)](
        x, y, indices,
        total, channels, height, width, out_h, out_w,
        *x.stride(), *y.stride(),
        _max_span(height, out_h), _max_span(width, out_w),
        CHANNELS_LAST=memory_format_of(y) == torch.channels_last, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return y, indices


@on_input_device
def adaptive_max_pool2d_backward(
    grad_y: torch.Tensor, indices: torch.Tensor, input_size: tuple[int, int]
) -> torch.Tensor:
    """Gradient of adaptive max pooling: each input pixel sums ``grad_y`` of the windows whose argmax it is.

    grad_y: B x C x OH x OW (any strides, expanded allowed); indices: B x C x OH x OW int64 from the forward;
    input_size: (H, W). Returns grad_x: B x C x H x W in grad_y's dtype and memory format.
    """
    batch, channels, out_h, out_w = grad_y.shape
    height, width = input_size
    grad_x = empty_output((batch, channels, height, width), grad_y)
    if grad_x.numel() == 0:
        return grad_x
    _check_index_range({"grad_x": grad_x, "grad_y": grad_y}, (height, width), (out_h, out_w))
    grad_x.zero_()  # the routing writes only the inputs some window picked
    total = grad_y.numel()
    block, num_warps = _config(total, ROUTE_CONFIGS)
    _adaptive_max_pool2d_backward_kernel[_grid(total, block)](
        grad_y, indices, grad_x,
        total, channels, height, width, out_h, out_w,
        *grad_y.stride(), *indices.stride(), *grad_x.stride(),
        _max_span(out_h, height), _max_span(out_w, width),
        CHANNELS_LAST=memory_format_of(grad_x) == torch.channels_last, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return grad_x


@on_input_device
def adaptive_avg_pool2d_forward(x: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling.

    x: B x C x H x W (fp32/fp16/bf16, any strides); output_size: (OH, OW). Returns y: B x C x OH x OW in x's
    dtype and memory format.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = output_size
    y = empty_output((batch, channels, out_h, out_w), x)
    total = y.numel()
    if total == 0:
        return y
    _check_index_range({"x": x, "the output": y}, (height, width), (out_h, out_w))
    block, num_warps = _config(total)
    _adaptive_avg_pool2d_forward_kernel[_grid(total, block)](
        x, y,
        total, channels, height, width, out_h, out_w,
        *x.stride(), *y.stride(),
        _max_span(height, out_h), _max_span(width, out_w),
        CHANNELS_LAST=memory_format_of(y) == torch.channels_last, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return y


@on_input_device
def adaptive_avg_pool2d_backward(grad_y: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """Gradient of adaptive average pooling: each input pixel sums ``grad_y / window area`` of its windows.

    grad_y: B x C x OH x OW (any strides, expanded allowed); input_size: (H, W). Returns grad_x:
    B x C x H x W in grad_y's dtype and memory format.
    """
    batch, channels, out_h, out_w = grad_y.shape
    height, width = input_size
    grad_x = empty_output((batch, channels, height, width), grad_y)
    total = grad_x.numel()
    if total == 0:
        return grad_x
    _check_index_range({"grad_x": grad_x}, (height, width), (out_h, out_w))
    block, num_warps = _config(total)
    _adaptive_avg_pool2d_backward_kernel[_grid(total, block)](
        grad_y, grad_x,
        total, channels, height, width, out_h, out_w,
        *grad_y.stride(), *grad_x.stride(),
        _max_span(out_h, height), _max_span(out_w, width),
        CHANNELS_LAST=memory_format_of(grad_x) == torch.channels_last, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return grad_x


# Runtime arguments after the pointers of each kernel: sizes, strides of every tensor, window-loop bounds.
_SIZES = ("total", "C", "H", "W", "OH", "OW")


def _strides(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}_stride_{dim}" for dim in "bchw")


def _signature(pointers: dict[str, str], strides: tuple[str, ...], loops: tuple[str, str]) -> dict[str, str]:
    signature = dict(pointers)
    signature.update({name: "i32" for name in _SIZES + strides + loops})
    signature.update({"CHANNELS_LAST": "constexpr", "BLOCK": "constexpr"})
    return signature


def aot_cases() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every kernel at every (BLOCK, num_warps) config and both layouts in fp32, plus fp16/bf16 variants.

    Each case is ``(name, jit_fn, signature, constexprs, num_warps)``; ``signature`` lists every parameter in
    order, the constexpr ones as ``"constexpr"`` (values in ``constexprs``).
    """
    forward_loops = ("max_window_h", "max_window_w")
    backward_loops = ("max_windows_h", "max_windows_w")

    def kernels(dtype: str):
        value = f"*{dtype}"
        return (
            (
                "adaptive_max_pool2d_forward",
                _adaptive_max_pool2d_forward_kernel,
                _signature(
                    {"x_ptr": value, "y_ptr": value, "indices_ptr": "*i64"},
                    _strides("x") + _strides("y"),
                    forward_loops,
                ),
                CONFIGS,
            ),
            (
                "adaptive_max_pool2d_backward",
                _adaptive_max_pool2d_backward_kernel,
                _signature(
                    {"grad_y_ptr": value, "indices_ptr": "*i64", "grad_x_ptr": value},
                    _strides("g") + _strides("i") + _strides("x"),
                    backward_loops,
                ),
                ROUTE_CONFIGS,
            ),
            (
                "adaptive_avg_pool2d_forward",
                _adaptive_avg_pool2d_forward_kernel,
                _signature({"x_ptr": value, "y_ptr": value}, _strides("x") + _strides("y"), forward_loops),
                CONFIGS,
            ),
            (
                "adaptive_avg_pool2d_backward",
                _adaptive_avg_pool2d_backward_kernel,
                _signature(
                    {"grad_y_ptr": value, "grad_x_ptr": value}, _strides("g") + _strides("x"), backward_loops
                ),
                CONFIGS,
            ),
        )

    cases = []
    for channels_last in (False, True):
        layout = "nhwc" if channels_last else "nchw"
        for name, fn, signature, configs in kernels("fp32"):
            for block, num_warps in configs:
                constexprs = {"CHANNELS_LAST": channels_last, "BLOCK": block}
                cases.append((f"{name}_fp32_{layout}_b{block}_w{num_warps}", fn, signature, constexprs, num_warps))
    for dtype in ("fp16", "bf16"):
        for name, fn, signature, configs in kernels(dtype):
            block, num_warps = configs[0]
            constexprs = {"CHANNELS_LAST": False, "BLOCK": block}
            cases.append((f"{name}_{dtype}_nchw_b{block}_w{num_warps}", fn, signature, constexprs, num_warps))
    return cases
