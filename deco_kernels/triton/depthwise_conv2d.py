"""Triton depthwise 'same' convolution (stride 1, odd kernels up to 31 x 31): forward, grad-input, grad-weight/bias.

The kernels here are shared with :mod:`deco_kernels.triton.upsample_add_conv`, whose conv input is the nearest
upsampled query plus the memory, computed on the fly (``UPSAMPLE``).

Design (see the kernels brief): each program owns a register tile of BLOCK_C channels x BLOCK_H rows x
BLOCK_W columns of one image and loops over the kh x kw taps, loading the shifted (halo) input tile and doing
one fp32 FMA per output and tap. Every tensor is addressed through its own strides, so NCHW and channels-last
tensors (and a mix of both) work without copies; Triton specialises unit strides, which tells the compiler
which axis is contiguous. NCHW tiles are one channel wide and W-major; channels-last tiles put BLOCK_C
channels along the contiguous axis so that every load is coalesced over channels.

The weight gradient is deterministic: each program reduces gy * x over its spatial tile and all images for
every tap and writes one partial sum per (tile, channel, tap) into a buffer; a second kernel sums the buffer's
rows in a fixed order. No atomics.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy
import torch
import triton
import triton.language as tl

from deco_kernels.backend import triton_interpreted
from deco_kernels.ops import _common
from deco_kernels.triton import on_input_device

__all__ = [
    "aot_cases",
    "depthwise_conv2d_backward",
    "depthwise_conv2d_forward",
]


class TileConfig(NamedTuple):
    """A register tile (channels x rows x columns) and the warps that own it."""

    name: str
    block_c: int
    block_h: int
    block_w: int
    num_warps: int


# NCHW: one channel per program, tiles wide along W (contiguous). Sized for DECO's maps on an H100: the 10x10
# query grid fits one 16x16 tile, 25x42 takes 8x64 tiles (4 per plane), stride-8/16 maps take 16x64 tiles.
NCHW_TILES = (
    TileConfig("nchw_16x16", 1, 16, 16, 2),
    TileConfig("nchw_16x32", 1, 16, 32, 4),
    TileConfig("nchw_8x64", 1, 8, 64, 4),
    TileConfig("nchw_16x64", 1, 16, 64, 8),
)
# Channels-last: channels along the contiguous axis (64 fp32 channels = two 128-byte lines per pixel).
CHANNELS_LAST_TILES = (
    TileConfig("cl_16c_4x8", 16, 4, 8, 2),
    TileConfig("cl_32c_4x8", 32, 4, 8, 4),
    TileConfig("cl_64c_2x8", 64, 2, 8, 4),
)
TILES = NCHW_TILES + CHANNELS_LAST_TILES
_SUM_BLOCK_ROWS = 8
_SUM_BLOCK_COLS = 128
_SUM_NUM_WARPS = 4


# Triton's CPU interpreter pays per operation, not per element: there one program covers a whole image (all
# channels), which keeps the tests fast. The GPU tiles above are exercised under the interpreter by tests that
# force each of them.
_INTERPRETER_MAX_ELEMENTS = 1 << 16


def tile_config(t: torch.Tensor) -> TileConfig:
    """The tile for a B x C x H x W map ``t`` (picked by layout and size; nothing is timed at run time)."""
    _, channels, height, width = t.shape
    if t.device.type == "cpu" and triton_interpreted():
        whole = [triton.next_power_of_2(max(1, n)) for n in (channels, height, width)]
        while whole[0] * whole[1] * whole[2] > _INTERPRETER_MAX_ELEMENTS:
            whole[whole.index(max(whole))] //= 2
        return TileConfig("interpreter", *whole, 4)
    if _common.memory_format_of(t) is torch.channels_last and channels > 1:
        if channels >= 64:
            return CHANNELS_LAST_TILES[2]
        if channels >= 32:
            return CHANNELS_LAST_TILES[1]
        return CHANNELS_LAST_TILES[0]
    if width <= 16:
        return NCHW_TILES[0]
    if width <= 32:
        return NCHW_TILES[1]
    if height <= 32 or width <= 64:
        return NCHW_TILES[2]
    return NCHW_TILES[3]


def tile_grid(shape, tile: TileConfig) -> tuple[int, int, int]:
    """Number of channel, row and column blocks covering a B x C x H x W map."""
    _, channels, height, width = shape
    return (triton.cdiv(channels, tile.block_c), triton.cdiv(height, tile.block_h), triton.cdiv(width, tile.block_w))


@functools.lru_cache(maxsize=256)
def nearest_scale(in_size: int, out_size: int) -> float:
    """PyTorch's nearest-resize scale ``(float)in / out``: the float32 quotient, as ATen computes it.

    Rounding the double quotient to float32 gives the correctly rounded float32 quotient (double rounding is
    innocuous for division since 53 >= 2 * 24 + 2).
    """
    return float(numpy.float32(in_size / out_size))


@triton.jit
def _tile_ranges(
    n_c_blocks, n_h_blocks, n_w_blocks, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr
):
    """This program's batch index (int64) and its channel, row and column ranges (BLOCK_C, BLOCK_H, BLOCK_W).

    Programs are numbered column block fastest, then row block, channel block and batch.
    """
    pid = tl.program_id(0)
    pid_w = pid % n_w_blocks
    rest = pid // n_w_blocks
    pid_h = rest % n_h_blocks
    rest = rest // n_h_blocks
    pid_c = rest % n_c_blocks
    b = (rest // n_c_blocks).to(tl.int64)

    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ws = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    return b, cs, hs, ws


@triton.jit
def _nearest_source(dst, scale, in_size):
    """PyTorch's legacy nearest rule ``min(floor(dst * scale), in_size - 1)`` with an fp32 scale (dst >= 0)."""
    src = (dst.to(tl.float32) * scale).to(tl.int32)
    return tl.minimum(src, in_size - 1)


@triton.jit
def _conv_forward_kernel(
    x_ptr, m_ptr, w_ptr, bias_ptr, y_ptr,
    C, H, W, Hq, Wq, scale_h, scale_w,
    sx_b, sx_c, sx_h, sx_w,
    sm_b, sm_c, sm_h, sm_w,
    sy_b, sy_c, sy_h, sy_w,
    sw_c, sw_t,
    n_c_blocks, n_h_blocks, n_w_blocks,
    KH: tl.constexpr, KW: tl.constexpr,
    FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, UPSAMPLE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """y = dwconv(input, w [flipped]) (+ bias) (+ the upsampled query when UPSAMPLE), one tile per program.

    The conv input is x, or with UPSAMPLE query[src(h), src(w)] + memory[h, w] where x is the B x C x Hq x Wq
    query (never materialised). FLIP correlates with the kernel rotated by 180 degrees: the input gradient of
    a 'same' odd convolution. Tap t of channel c's weights is at w + c * sw_c + t * sw_t (see launch_conv_forward).
    """
    b, cs, hs, ws = _tile_ranges(n_c_blocks, n_h_blocks, n_w_blocks, BLOCK_C, BLOCK_H, BLOCK_W)
    c_ok = cs[:, None, None] < C
    x_channels = x_ptr + b * sx_b + cs[:, None, None] * sx_c
    m_channels = m_ptr + b * sm_b + cs[:, None, None] * sm_c
    w_channels = w_ptr + cs * sw_c

    acc = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W), dtype=tl.float32)
    # Row pointers and masks are built once per kernel row; the inner loop only shifts columns.
    for i in range(KH):
        hh = hs + (i - KH // 2)
        row_ok = c_ok & ((hh >= 0) & (hh < H))[None, :, None]
        if UPSAMPLE:
            x_rows = x_channels + _nearest_source(hh, scale_h, Hq)[None, :, None] * sx_h
            m_rows = m_channels + hh[None, :, None] * sm_h
        else:
            x_rows = x_channels + hh[None, :, None] * sx_h
        if FLIP:
            w_row = w_channels + ((KH - 1 - i) * KW + (KW - 1)) * sw_t
        else:
            w_row = w_channels + i * KW * sw_t
        for j in range(KW):
            ww = ws + (j - KW // 2)
            mask = row_ok & ((ww >= 0) & (ww < W))[None, None, :]
            if UPSAMPLE:
                value = tl.load(x_rows + _nearest_source(ww, scale_w, Wq)[None, None, :] * sx_w,
                                mask=mask, other=0.0).to(tl.float32)
                value += tl.load(m_rows + ww[None, None, :] * sm_w, mask=mask, other=0.0).to(tl.float32)
            else:
                value = tl.load(x_rows + ww[None, None, :] * sx_w, mask=mask, other=0.0).to(tl.float32)
            if FLIP:
                weight = tl.load(w_row - j * sw_t, mask=cs < C, other=0.0)
            else:
                weight = tl.load(w_row + j * sw_t, mask=cs < C, other=0.0)
            acc += value * weight[:, None, None]

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cs, mask=cs < C, other=0.0)[:, None, None]
    out_mask = c_ok & (hs < H)[None, :, None] & (ws < W)[None, None, :]
    if UPSAMPLE:
        # The CIM's residual: the upsampled query itself, again never stored.
        qh = _nearest_source(hs, scale_h, Hq)
        qw = _nearest_source(ws, scale_w, Wq)
        acc += tl.load(x_channels + qh[None, :, None] * sx_h + qw[None, None, :] * sx_w,
                       mask=out_mask, other=0.0).to(tl.float32)
    y_offsets = cs[:, None, None] * sy_c + hs[None, :, None] * sy_h + ws[None, None, :] * sy_w
    tl.store(y_ptr + b * sy_b + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv_weight_grad_kernel(
    gy_ptr, x_ptr, m_ptr, partial_ptr,
    B, C, H, W, Hq, Wq, scale_h, scale_w,
    sg_b, sg_c, sg_h, sg_w,
    sx_b, sx_c, sx_h, sx_w,
    sm_b, sm_c, sm_h, sm_w,
    n_c_blocks, n_w_blocks, n_cols, bias_col,
    KH: tl.constexpr, KW: tl.constexpr,
    WEIGHT: tl.constexpr, BIAS: tl.constexpr, UPSAMPLE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Per-tile partial sums of the weight and bias gradients over all images.

    partial (n_tiles x n_cols, fp32): column c * KH * KW + tap holds sum(gy * input shifted by the tap) over
    this spatial tile, column bias_col + c holds sum(gy). The program for (spatial tile, channel block)
    writes exactly its channels' columns of row ``tile``. The input is x, or with UPSAMPLE the upsampled
    query plus the memory, recomputed on the fly.
    """
    pid = tl.program_id(0)
    pid_c = pid % n_c_blocks
    tile = pid // n_c_blocks
    pid_w = tile % n_w_blocks
    pid_h = tile // n_w_blocks

    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ws = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    c_ok = cs[:, None, None] < C
    out_mask = c_ok & (hs < H)[None, :, None] & (ws < W)[None, None, :]
    g_tile = gy_ptr + cs[:, None, None] * sg_c + hs[None, :, None] * sg_h + ws[None, None, :] * sg_w
    x_channels = x_ptr + cs[:, None, None] * sx_c
    m_channels = m_ptr + cs[:, None, None] * sm_c
    row = partial_ptr + tile.to(tl.int64) * n_cols

    if BIAS:
        grads = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W), dtype=tl.float32)
        for b in range(B):
            grads += tl.load(g_tile + b * sg_b, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(row + bias_col + cs, tl.sum(tl.sum(grads, axis=2), axis=1), mask=cs < C)
    if WEIGHT:
        for i in range(KH):
            hh = hs + (i - KH // 2)
            row_ok = out_mask & ((hh >= 0) & (hh < H))[None, :, None]
            if UPSAMPLE:
                x_rows = x_channels + _nearest_source(hh, scale_h, Hq)[None, :, None] * sx_h
                m_rows = m_channels + hh[None, :, None] * sm_h
            else:
                x_rows = x_channels + hh[None, :, None] * sx_h
            for j in range(KW):
                ww = ws + (j - KW // 2)
                mask = row_ok & ((ww >= 0) & (ww < W))[None, None, :]
                if UPSAMPLE:
                    x_taps = x_rows + _nearest_source(ww, scale_w, Wq)[None, None, :] * sx_w
                    m_taps = m_rows + ww[None, None, :] * sm_w
                else:
                    x_taps = x_rows + ww[None, None, :] * sx_w
                # Summing the products over images element-wise first leaves one tile reduction per tap.
                products = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W), dtype=tl.float32)
                g_taps = g_tile
                for _ in range(B):
                    value = tl.load(x_taps, mask=mask, other=0.0).to(tl.float32)
                    if UPSAMPLE:
                        value += tl.load(m_taps, mask=mask, other=0.0).to(tl.float32)
                        m_taps += sm_b
                    products += tl.load(g_taps, mask=mask, other=0.0).to(tl.float32) * value
                    x_taps += sx_b
                    g_taps += sg_b
                tl.store(row + cs * (KH * KW) + (i * KW + j), tl.sum(tl.sum(products, axis=2), axis=1),
                         mask=cs < C)


@triton.jit
def _sum_rows_kernel(
    partial_ptr, weight_out_ptr, bias_out_ptr, n_rows, n_cols, n_weight_cols,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Column sums of partial (n_rows x n_cols), always in the same order (deterministic).

    Columns below n_weight_cols go to weight_out, the rest to bias_out (two separate tensors).
    """
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        acc += tl.load(partial_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    is_weight = cols < n_weight_cols
    tl.store(weight_out_ptr + cols, total, mask=col_ok & is_weight)
    tl.store(bias_out_ptr + (cols - n_weight_cols), total, mask=col_ok & (cols >= n_weight_cols))


def check_parameters(weight: torch.Tensor, bias: torch.Tensor | None, channels: int, op: str) -> tuple[int, int]:
    """The primitives' parameter contract: contiguous float32 C x 1 x kh x kw weight and C bias. Returns (kh, kw)."""
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError(f"{op}: weight must be contiguous float32 (the op casts parameters); got {weight.dtype}")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError(f"{op}: bias must be contiguous float32 (the op casts parameters); got {bias.dtype}")
    return _common.check_depthwise_weight(weight, channels, weight.device, op)


def lay_out_weights(weight: torch.Tensor, channel_lanes: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """C x 1 x kh x kw weights as a conv kernel reads them, with their (channel, tap) strides: a tap-major
    (kh * kw x C) copy for tiles whose lanes span channels (a tap's weights are then one line, not one per
    channel), else the weights themselves (a tile of one channel per pixel column reads them as a broadcast)."""
    channels, taps = weight.shape[0], weight.shape[2] * weight.shape[3]
    if channel_lanes:
        return weight.reshape(channels, taps).t().contiguous(), (1, channels)
    return weight, (taps, 1)


def launch_conv_forward(
    x: torch.Tensor,
    memory: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    flip: bool,
) -> None:
    """Write dwconv(x) (+ bias) into ``out``, or, with ``memory``, dwconv(up(x) + memory) (+ bias) + up(x).

    x: B x C x H x W (or the B x C x Hq x Wq query); memory, out: B x C x H x W; weight: C x 1 x kh x kw fp32.
    """
    batch, channels, height, width = out.shape
    kh, kw = weight.shape[-2:]
    tile = tile_config(out)
    n_c, n_h, n_w = tile_grid(out.shape, tile)
    query_h, query_w = x.shape[-2:]
    m = x if memory is None else memory
    weights, weight_strides = lay_out_weights(weight, tile.block_c > 1)
    _conv_forward_kernel[(batch * n_c * n_h * n_w,)](
        x, m, weights, weights if bias is None else bias, out,
        channels, height, width, query_h, query_w,
        nearest_scale(query_h, height), nearest_scale(query_w, width),
        *x.stride(), *m.stride(), *out.stride(),
        *weight_strides,
        n_c, n_h, n_w,
        KH=kh, KW=kw, FLIP=flip, HAS_BIAS=bias is not None, UPSAMPLE=memory is not None,
        BLOCK_C=tile.block_c, BLOCK_H=tile.block_h, BLOCK_W=tile.block_w, num_warps=tile.num_warps,
    )


def launch_weight_grad(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    memory: torch.Tensor | None,
    kernel_size: tuple[int, int],
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_weight C x 1 x kh x kw, grad_bias C), fp32, each None unless asked for.

    The conv input is x, or up(x) + memory when ``memory`` is given (x is then the query).
    """
    batch, channels, height, width = grad_y.shape
    kh, kw = kernel_size
    n_weight_cols = channels * kh * kw if need_weight else 0
    n_cols = n_weight_cols + (channels if need_bias else 0)
    grad_weight = _common.empty_output((channels, 1, kh, kw), grad_y, dtype=torch.float32) if need_weight else None
    grad_bias = _common.empty_output((channels,), grad_y, dtype=torch.float32) if need_bias else None
    if n_cols == 0:
        return grad_weight, grad_bias
    if batch == 0:
        for grad in (grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
        return grad_weight, grad_bias
    tile = tile_config(grad_y)
    n_c, n_h, n_w = tile_grid(grad_y.shape, tile)
    partial = _common.empty_output((n_h * n_w, n_cols), grad_y, dtype=torch.float32)
    query_h, query_w = x.shape[-2:]
    m = x if memory is None else memory
    _conv_weight_grad_kernel[(n_c * n_h * n_w,)](
        grad_y, x, m, partial,
        batch, channels, height, width, query_h, query_w,
        nearest_scale(query_h, height), nearest_scale(query_w, width),
        *grad_y.stride(), *x.stride(), *m.stride(),
        n_c, n_w, n_cols, n_weight_cols,
        KH=kh, KW=kw, WEIGHT=need_weight, BIAS=need_bias, UPSAMPLE=memory is not None,
        BLOCK_C=tile.block_c, BLOCK_H=tile.block_h, BLOCK_W=tile.block_w, num_warps=tile.num_warps,
    )
    _sum_rows_kernel[(triton.cdiv(n_cols, _SUM_BLOCK_COLS),)](
        partial, partial if grad_weight is None else grad_weight, partial if grad_bias is None else grad_bias,
        n_h * n_w, n_cols, n_weight_cols,
        BLOCK_ROWS=_SUM_BLOCK_ROWS, BLOCK_COLS=_SUM_BLOCK_COLS, num_warps=_SUM_NUM_WARPS,
    )
    return grad_weight, grad_bias


@on_input_device
def depthwise_conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C).

    x: B x C x H x W (fp32/fp16/bf16, NCHW or channels-last); weight: C x 1 x kh x kw fp32; bias: C fp32 or None.
    Returns y: B x C x H x W in x's dtype and memory format.
    """
    check_parameters(weight, bias, x.shape[1], "depthwise_conv2d_forward")
    y = _common.empty_output(x.shape, x)
    if y.numel():
        launch_conv_forward(x, None, weight, bias, y, flip=False)
    return y


@on_input_device
def depthwise_conv2d_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, output_mask: list[bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x B x C x H x W in x's dtype/format, grad_weight C x 1 x kh x kw fp32, grad_bias C fp32).

    grad_y, x: B x C x H x W; output_mask: which of the three to compute (the others are None).
    """
    kh, kw = check_parameters(weight, None, x.shape[1], "depthwise_conv2d_backward")
    need_x, need_weight, need_bias = output_mask
    grad_x = None
    if need_x:
        grad_x = _common.empty_output(x.shape, x)
        if grad_x.numel():
            launch_conv_forward(grad_y, None, weight, None, grad_x, flip=True)
    grad_weight, grad_bias = launch_weight_grad(grad_y, x, None, (kh, kw), need_weight, need_bias)
    return grad_x, grad_weight, grad_bias


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_signature(fn, pointer_types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """A triton.compile signature for ``fn``: pointers by name, fp32 scales, i32 for every other runtime int."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types[name]
        elif name.startswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def unit_strides(tile: TileConfig, prefixes: tuple[str, ...]) -> dict[str, int]:
    """The stride arguments that are 1 for a tile's layout (Triton specialises them to constants when run)."""
    axis = "c" if tile.block_c > 1 else "w"
    return {f"{prefix}_{axis}": 1 for prefix in prefixes}


def conv_aot_cases(upsample: bool, prefix: str, kernel_size: int) -> list[tuple[str, object, dict, dict, int]]:
    """(name, kernel, signature, constexprs, num_warps) for the forward and weight-grad kernels at every tile."""
    cases = []
    for index, tile in enumerate(TILES):
        dtype = _TRITON_DTYPES[(torch.float32, torch.bfloat16, torch.float16)[index % 3]]
        blocks = {"BLOCK_C": tile.block_c, "BLOCK_H": tile.block_h, "BLOCK_W": tile.block_w}
        taps = {"KH": kernel_size, "KW": kernel_size}
        forward = {**taps, "FLIP": False, "HAS_BIAS": True, "UPSAMPLE": upsample, **blocks,
                   **unit_strides(tile, ("sx", "sm", "sy"))}
        pointers = {"x_ptr": f"*{dtype}", "m_ptr": f"*{dtype}", "w_ptr": "*fp32", "bias_ptr": "*fp32",
                    "y_ptr": f"*{dtype}"}
        cases.append((f"{prefix}_forward_{tile.name}_{dtype}", _conv_forward_kernel,
                      aot_signature(_conv_forward_kernel, pointers, forward), forward, tile.num_warps))
        weight_grad = {**taps, "WEIGHT": True, "BIAS": True, "UPSAMPLE": upsample, **blocks,
                       **unit_strides(tile, ("sg", "sx", "sm"))}
        pointers = {"gy_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "m_ptr": f"*{dtype}", "partial_ptr": "*fp32"}
        cases.append((f"{prefix}_weight_grad_{tile.name}_{dtype}", _conv_weight_grad_kernel,
                      aot_signature(_conv_weight_grad_kernel, pointers, weight_grad), weight_grad, tile.num_warps))
    return cases


def aot_cases() -> list[tuple[str, object, dict, dict, int]]:
    """Every kernel of this module at every tuning configuration, for the ahead-of-time compile test."""
    cases = conv_aot_cases(upsample=False, prefix="depthwise", kernel_size=7)
    # The input gradient is the forward kernel with the rotated kernel and no bias.
    tile = NCHW_TILES[2]
    flip = {"KH": 9, "KW": 9, "FLIP": True, "HAS_BIAS": False, "UPSAMPLE": False, "BLOCK_C": tile.block_c,
            "BLOCK_H": tile.block_h, "BLOCK_W": tile.block_w, **unit_strides(tile, ("sx", "sm", "sy"))}
    pointers = {"x_ptr": "*fp32", "m_ptr": "*fp32", "w_ptr": "*fp32", "bias_ptr": "*fp32", "y_ptr": "*fp32"}
    cases.append((f"depthwise_grad_input_{tile.name}_fp32", _conv_forward_kernel,
                  aot_signature(_conv_forward_kernel, pointers, flip), flip, tile.num_warps))
    sums = {"BLOCK_ROWS": _SUM_BLOCK_ROWS, "BLOCK_COLS": _SUM_BLOCK_COLS}
    pointers = {"partial_ptr": "*fp32", "weight_out_ptr": "*fp32", "bias_out_ptr": "*fp32"}
    cases.append(("sum_rows", _sum_rows_kernel, aot_signature(_sum_rows_kernel, pointers, sums), sums,
                  _SUM_NUM_WARPS))
    return cases
