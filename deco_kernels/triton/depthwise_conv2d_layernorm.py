"""Triton LayerNorm over channels of a depthwise 'same' convolution, written channels-last (DECO's block front).

``out[b, h, w, :] = LN(dwconv(x)[b, :, h, w]) * norm_weight + norm_bias`` for a B x C x H x W input x (NCHW or
channels-last); out is B x H x W x C contiguous, the layout the Linear layers after it read. The conv output
is never written.

Design: each program owns BLOCK_P consecutive pixels (flat ``h * W + w``) of one image times all C channels
(BLOCK_C, C padded to a power of two): the LayerNorm needs every channel of a pixel in one program. The tap
loop does one fp32 FMA per output and tap on the shifted (halo) input tile, then mean and rstd are reduced
over channels in registers. The kernels read x channels-last (NCHW x is copied first): the tile is pixels x
channels with the channels contiguous, so a tap's load is coalesced over channels and a shift is one offset
``(dh * W + dw) * C``. From NCHW x a tile holds only BLOCK_P consecutive pixels per channel (4 to 8 at
DECO's widths), so each warp load would touch a line per channel: 4 to 8 times the L1 traffic at every tap,
far more than the copy. The forward saves the per-pixel mean and rstd (B x H x W, fp32).

Backward: a kernel recomputes the conv output of a tile, applies the LayerNorm backward with the saved mean
and rstd and writes the conv output's gradient (B x C x H x W in x's dtype and format, through its
strides); the depthwise
backward of :mod:`deco_kernels.triton.depthwise_conv2d` turns it into the x, weight and bias gradients. The
norm_weight/norm_bias gradients are deterministic: each program sums its pixels into its own row of a
partial-sum buffer, and the rows are summed in a fixed order. No atomics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deco_kernels.backend import triton_interpreted
from deco_kernels.ops import _common
from deco_kernels.triton import on_input_device
from deco_kernels.triton.depthwise_conv2d import (
    _SUM_BLOCK_COLS,
    _SUM_BLOCK_ROWS,
    _SUM_NUM_WARPS,
    _TRITON_DTYPES,
    _sum_rows_kernel,
    aot_signature,
    check_parameters,
    depthwise_conv2d_backward,
    lay_out_weights,
)

__all__ = [
    "aot_cases",
    "depthwise_conv2d_layernorm_backward",
    "depthwise_conv2d_layernorm_forward",
]


class PixelTile(NamedTuple):
    """BLOCK_P pixels x BLOCK_C channels per program (C <= BLOCK_C) and the warps that own them in the forward
    and the backward kernel."""

    name: str
    block_c: int
    block_p: int
    forward_warps: int
    backward_warps: int


# 8 values per thread and tile tensor: Triton keeps an address per element of each tile it loads and the
# backward holds about three tiles, so 16 per thread spilled on sm_80/sm_90a in places. DECO's 120/240/480
# channels take the 128/256/512 rows (8, 4 and 4 pixels per program). One tile per power of two up to
# _common.MAX_LAYERNORM_CHANNELS. The 2048-channel forward takes 16 warps: at 8, triton 3.6's ptxas spilled
# it on sm_80 (24 bytes), while its backward spilled at 16 on sm_90a and fits at 8.
TILES = (
    PixelTile("c16_p64", 16, 64, 4, 4),
    PixelTile("c32_p32", 32, 32, 4, 4),
    PixelTile("c64_p16", 64, 16, 4, 4),
    PixelTile("c128_p8", 128, 8, 4, 4),
    PixelTile("c256_p4", 256, 4, 4, 4),
    PixelTile("c512_p4", 512, 4, 8, 8),
    PixelTile("c1024_p2", 1024, 2, 8, 8),
    PixelTile("c2048_p1", 2048, 1, 16, 8),
)
# The backward's programs each loop over a run of pixel blocks so that the partial-sum buffer of the norm
# gradients has at most this many rows (enough programs to fill a GPU, few rows to sum).
_MAX_PARTIAL_ROWS = 512
# Under Triton's CPU interpreter, which pays per operation rather than per element, one program covers up to
# this many values (a whole small image); the GPU tiles are exercised there by tests that force each of them.
_INTERPRETER_MAX_ELEMENTS = 1 << 16


def pixel_tile(x: torch.Tensor) -> PixelTile:
    """The tile for a B x C x H x W input (picked by C; C <= MAX_LAYERNORM_CHANNELS)."""
    _, channels, height, width = x.shape
    block_c = max(TILES[0].block_c, triton.next_power_of_2(channels))
    if x.device.type == "cpu" and triton_interpreted():
        block_p = min(triton.next_power_of_2(height * width), max(1, _INTERPRETER_MAX_ELEMENTS // block_c))
        return PixelTile("interpreter", block_c, block_p, 4, 4)
    return next(tile for tile in TILES if tile.block_c == block_c)


@triton.jit
def _pixel_block(block, n_p_blocks, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pixel block ``block`` (numbered pixel block fastest, then image) as a BLOCK_P x BLOCK_C tile.

    Returns the image (int64 scalar); the flat pixels ``h * W + w``, their rows, columns and in-image mask
    (BLOCK_P x 1); the channels and their mask (1 x BLOCK_C). Everything is built 2-D from the start: Triton
    then gives the loads and the accumulator one layout, coalesced along the channels, instead of
    re-laying-out tiles through shared memory at every tap.
    """
    b = (block // n_p_blocks).to(tl.int64)
    ps = (block % n_p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
    cs = tl.arange(0, BLOCK_C)[None, :]
    return b, ps, ps // W, ps % W, ps < H * W, cs, cs < C


@triton.jit
def _conv_pixel_tile(
    x_ptr, w_ptr, bias_ptr, b, ps, hs, ws, p_ok, cs, c_ok,
    C, H, W, sx_b, sx_c, sx_p,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The depthwise conv output (+ bias) in fp32 on the tile of :func:`_pixel_block`, exactly 0 at channels
    >= C (their weights and bias load as 0). x is channels-last-contiguous (sx_c is 1, and Triton specialises
    it); w is tap-major (:func:`lay_out_weights` for channel lanes)."""
    # 32-bit offsets from the image's base pointer (one image fits 32-bit indexing): a 64-bit pointer per tile
    # element would double the registers the loop-invariant offsets hold.
    x_image = x_ptr + b * sx_b
    channel_offsets = cs * sx_c
    w_channels = w_ptr + cs
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in range(KH):
        hh = hs + (i - KH // 2)
        row_ok = p_ok & (hh >= 0) & (hh < H)
        for j in range(KW):
            ww = ws + (j - KW // 2)
            mask = row_ok & (ww >= 0) & (ww < W) & c_ok
            # x is dense over pixels, so the tap's pixel is ps shifted by one flat offset.
            shifted = (ps + ((i - KH // 2) * W + (j - KW // 2))) * sx_p
            value = tl.load(x_image + (channel_offsets + shifted), mask=mask, other=0.0).to(tl.float32)
            weight = tl.load(w_channels + (i * KW + j) * C, mask=c_ok, other=0.0)
            acc += value * weight
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cs, mask=c_ok, other=0.0)
    return acc


@triton.jit
def _conv_layernorm_forward_kernel(
    x_ptr, w_ptr, bias_ptr, nw_ptr, nb_ptr, out_ptr, mean_ptr, rstd_ptr,
    C, H, W, eps,
    sx_b, sx_c, sx_p,
    n_p_blocks,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = LN(dwconv(x)) over channels for one pixel block; also the block's mean and rstd."""
    b, ps, hs, ws, p_ok, cs, c_ok = _pixel_block(tl.program_id(0), n_p_blocks, H, W, C, BLOCK_P, BLOCK_C)
    y = _conv_pixel_tile(x_ptr, w_ptr, bias_ptr, b, ps, hs, ws, p_ok, cs, c_ok, C, H, W, sx_b, sx_c, sx_p,
                         KH, KW, HAS_BIAS, BLOCK_P, BLOCK_C)
    mean = tl.sum(y, axis=1, keep_dims=True) / C
    centred = tl.where(c_ok, y - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1, keep_dims=True) / C + eps)
    norm_weight = tl.load(nw_ptr + cs, mask=c_ok, other=0.0)
    norm_bias = tl.load(nb_ptr + cs, mask=c_ok, other=0.0)
    out = centred * rstd * norm_weight + norm_bias
    pixels = b * (H * W) + ps  # the flat (b, h, w) index into B x H x W (x C) outputs
    tl.store(out_ptr + (pixels * C + cs), out.to(out_ptr.dtype.element_ty), mask=p_ok & c_ok)
    tl.store(mean_ptr + pixels, mean, mask=p_ok)
    tl.store(rstd_ptr + pixels, rstd, mask=p_ok)


@triton.jit
def _conv_layernorm_backward_kernel(
    go_ptr, x_ptr, w_ptr, bias_ptr, nw_ptr, mean_ptr, rstd_ptr, gy_ptr, partial_ptr,
    C, H, W,
    sx_b, sx_c, sx_p,
    sgo_b, sgo_h, sgo_w, sgo_c,
    sgy_b, sgy_c, sgy_p,
    n_p_blocks, n_blocks, blocks_per_program,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, GRAD_Y: tl.constexpr, NORM_GRADS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """LayerNorm backward on the recomputed conv output, for a run of ``blocks_per_program`` pixel blocks.

    With GRAD_Y, writes the conv output's gradient ``rstd * (g' - mean(g') - xhat * mean(g' * xhat))``,
    g' = grad_out * norm_weight, means over channels, through grad_y's strides (x's format). With NORM_GRADS,
    row ``program`` of partial (n_programs x 2C, fp32) gets the run's sums of grad_out * xhat (columns < C) and
    of grad_out (columns C..2C).
    """
    program = tl.program_id(0)
    sum_g_xhat = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    sum_g = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    first = program * blocks_per_program
    for block in range(first, tl.minimum(first + blocks_per_program, n_blocks)):
        b, ps, hs, ws, p_ok, cs, c_ok = _pixel_block(block, n_p_blocks, H, W, C, BLOCK_P, BLOCK_C)
        y = _conv_pixel_tile(x_ptr, w_ptr, bias_ptr, b, ps, hs, ws, p_ok, cs, c_ok, C, H, W, sx_b, sx_c, sx_p,
                             KH, KW, HAS_BIAS, BLOCK_P, BLOCK_C)
        pixels = b * (H * W) + ps
        mean = tl.load(mean_ptr + pixels, mask=p_ok, other=0.0)
        rstd = tl.load(rstd_ptr + pixels, mask=p_ok, other=0.0)
        xhat = (y - mean) * rstd
        mask = p_ok & c_ok
        # g is 0 outside the tile (padded channels, pixels past the image), so those add nothing below.
        g = tl.load(go_ptr + (b * sgo_b + hs * sgo_h + ws * sgo_w + cs * sgo_c), mask=mask, other=0.0)
        g = g.to(tl.float32)
        if NORM_GRADS:
            sum_g_xhat += tl.sum(g * xhat, axis=0, keep_dims=True)
            sum_g += tl.sum(g, axis=0, keep_dims=True)
        if GRAD_Y:
            # An explicitly rounded product (fma with +0 is not folded into a multiply): with g * w, LLVM would
            # contract g_scaled - mean_g into one FMA on the exact product, leaving its rounding error times rstd
            # where the exact result is 0 (C = 1).
            g_scaled = tl.fma(g, tl.load(nw_ptr + cs, mask=c_ok, other=0.0), 0.0)
            mean_g = tl.sum(g_scaled, axis=1, keep_dims=True) / C
            mean_g_xhat = tl.sum(g_scaled * xhat, axis=1, keep_dims=True) / C
            grad_y = (g_scaled - mean_g - xhat * mean_g_xhat) * rstd
            tl.store(gy_ptr + (b * sgy_b + cs * sgy_c + ps * sgy_p), grad_y.to(gy_ptr.dtype.element_ty), mask=mask)
    if NORM_GRADS:
        cs_sums = tl.arange(0, BLOCK_C)[None, :]
        row = partial_ptr + program.to(tl.int64) * (2 * C)
        tl.store(row + cs_sums, sum_g_xhat, mask=cs_sums < C)
        tl.store(row + C + cs_sums, sum_g, mask=cs_sums < C)


def _check_layout(x: torch.Tensor, op: str) -> None:
    if not _common.is_supported_layout(x):
        raise ValueError(f"{op}: x must be NCHW- or channels-last-contiguous; got strides {x.stride()}")


def _pixel_stride(t: torch.Tensor) -> int:
    """The stride between flat pixels ``h * W + w`` of a NCHW- or channels-last-contiguous B x C x H x W tensor.

    That is the stride of w, except that a dimension of size 1 may carry any stride in a contiguous tensor:
    with W == 1 the flat pixel is h.
    """
    return t.stride(3) if t.shape[3] > 1 else t.stride(2)


def _channels_last_copy(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: channels-last-contiguous (x itself when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def _check_norm_parameters(norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, channels: int, op: str) -> None:
    """The primitives' contract for the LayerNorm's affine parameters: contiguous float32 C vectors."""
    for t, name in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != (channels,)):
            raise ValueError(f"{op}: {name} must be a contiguous float32 ({channels},) tensor (the op casts "
                             f"parameters); got {t.dtype} {tuple(t.shape)}")
    if not 1 <= channels <= _common.MAX_LAYERNORM_CHANNELS:
        raise ValueError(f"{op}: the LayerNorm over channels needs 1 <= C <= {_common.MAX_LAYERNORM_CHANNELS}; "
                         f"got C={channels}")


@on_input_device
def depthwise_conv2d_layernorm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LN over channels of dwconv(x), channels-last.

    x: B x C x H x W (fp32/fp16/bf16, NCHW- or channels-last-contiguous); weight: C x 1 x kh x kw fp32; bias,
    norm_weight, norm_bias: C fp32 (bias may be None). Returns ``out`` (B x H x W x C contiguous, x's dtype)
    and the per-pixel ``mean`` and ``rstd`` of the conv output (B x H x W fp32).
    """
    op = "depthwise_conv2d_layernorm_forward"
    batch, channels, height, width = x.shape
    kh, kw = check_parameters(weight, bias, channels, op)
    _check_norm_parameters(norm_weight, norm_bias, channels, op)
    _check_layout(x, op)
    out = _common.empty_output((batch, height, width, channels), x, memory_format=torch.contiguous_format)
    mean = _common.empty_output((batch, height, width), x, dtype=torch.float32)
    rstd = _common.empty_output((batch, height, width), x, dtype=torch.float32)
    if out.numel() == 0:
        return out, mean, rstd
    tile = pixel_tile(x)
    n_p_blocks = triton.cdiv(height * width, tile.block_p)
    x_cl = _channels_last_copy(x)
    weights, _ = lay_out_weights(weight, channel_lanes=True)
    _conv_layernorm_forward_kernel[(batch * n_p_blocks,)](
        x_cl, weights, weights if bias is None else bias, norm_weight, norm_bias, out, mean, rstd,
        channels, height, width, eps,
        x_cl.stride(0), x_cl.stride(1), _pixel_stride(x_cl),
        n_p_blocks,
        KH=kh, KW=kw, HAS_BIAS=bias is not None, BLOCK_P=tile.block_p, BLOCK_C=tile.block_c,
        num_warps=tile.forward_warps,
    )
    return out, mean, rstd


@on_input_device
def depthwise_conv2d_layernorm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of :func:`depthwise_conv2d_layernorm_forward`.

    grad_out: B x H x W x C (any strides, e.g. expanded); x, weight, bias, norm_weight: as the forward got them;
    mean, rstd: the forward's B x H x W. output_mask: which of (grad_x, grad_weight, grad_bias,
    grad_norm_weight, grad_norm_bias) to compute; the others are None. grad_x is B x C x H x W in x's dtype and
    memory format, the parameter gradients are fp32 (C x 1 x kh x kw, then C each).
    """
    op = "depthwise_conv2d_layernorm_backward"
    batch, channels, height, width = x.shape
    kh, kw = check_parameters(weight, bias, channels, op)
    _check_norm_parameters(norm_weight, None, channels, op)
    if tuple(grad_out.shape) != (batch, height, width, channels):
        raise ValueError(f"{op}: grad_out must be B x H x W x C {(batch, height, width, channels)}; "
                         f"got {tuple(grad_out.shape)}")
    _check_layout(x, op)
    need_x, need_weight, need_bias, need_norm_weight, need_norm_bias = output_mask
    grad_y_needed = need_x or need_weight or need_bias
    norm_grads_needed = need_norm_weight or need_norm_bias

    grad_y = _common.empty_output(x.shape, x) if grad_y_needed else None
    grad_norm_weight = grad_norm_bias = None
    if norm_grads_needed:
        grad_norm_weight = _common.empty_output((channels,), x, dtype=torch.float32)
        grad_norm_bias = _common.empty_output((channels,), x, dtype=torch.float32)
    if x.numel() == 0:
        for grad in (grad_norm_weight, grad_norm_bias):
            if grad is not None:
                grad.zero_()
    elif grad_y_needed or norm_grads_needed:
        tile = pixel_tile(x)
        n_p_blocks = triton.cdiv(height * width, tile.block_p)
        n_blocks = batch * n_p_blocks
        blocks_per_program = triton.cdiv(n_blocks, _MAX_PARTIAL_ROWS)
        n_programs = triton.cdiv(n_blocks, blocks_per_program)
        partial = (_common.empty_output((n_programs, 2 * channels), x, dtype=torch.float32)
                   if norm_grads_needed else mean)
        gy, gy_strides = (mean, (0, 0, 0)) if grad_y is None else (
            grad_y, (grad_y.stride(0), grad_y.stride(1), _pixel_stride(grad_y)))
        x_cl = _channels_last_copy(x)
        weights, _ = lay_out_weights(weight, channel_lanes=True)
        _conv_layernorm_backward_kernel[(n_programs,)](
            grad_out, x_cl, weights, weights if bias is None else bias, norm_weight, mean, rstd, gy, partial,
            channels, height, width,
            x_cl.stride(0), x_cl.stride(1), _pixel_stride(x_cl),
            *grad_out.stride(),
            *gy_strides,
            n_p_blocks, n_blocks, blocks_per_program,
            KH=kh, KW=kw, HAS_BIAS=bias is not None, GRAD_Y=grad_y_needed, NORM_GRADS=norm_grads_needed,
            BLOCK_P=tile.block_p, BLOCK_C=tile.block_c, num_warps=tile.backward_warps,
        )
        if norm_grads_needed:
            _sum_rows_kernel[(triton.cdiv(2 * channels, _SUM_BLOCK_COLS),)](
                partial, grad_norm_weight, grad_norm_bias, n_programs, 2 * channels, channels,
                BLOCK_ROWS=_SUM_BLOCK_ROWS, BLOCK_COLS=_SUM_BLOCK_COLS, num_warps=_SUM_NUM_WARPS,
            )
    grad_x = grad_weight = grad_bias = None
    if grad_y_needed:
        grad_x, grad_weight, grad_bias = depthwise_conv2d_backward(grad_y, x, weight, [need_x, need_weight, need_bias])
    return (
        grad_x,
        grad_weight,
        grad_bias,
        grad_norm_weight if need_norm_weight else None,
        grad_norm_bias if need_norm_bias else None,
    )


def aot_cases() -> list[tuple[str, object, dict, dict, int]]:
    """Both kernels at every tile (grad_y NCHW and channels-last), for the ahead-of-time compile test."""
    cases = []
    for index, tile in enumerate(TILES):
        dtype = _TRITON_DTYPES[(torch.float32, torch.bfloat16, torch.float16)[index % 3]]
        common = {"KH": 7, "KW": 7, "HAS_BIAS": True, "BLOCK_P": tile.block_p, "BLOCK_C": tile.block_c, "sx_c": 1}
        pointers = {"x_ptr": f"*{dtype}", "w_ptr": "*fp32", "bias_ptr": "*fp32", "nw_ptr": "*fp32",
                    "nb_ptr": "*fp32", "out_ptr": f"*{dtype}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
        signature = {**aot_signature(_conv_layernorm_forward_kernel, pointers, common), "eps": "fp32"}
        cases.append((f"forward_{tile.name}_{dtype}", _conv_layernorm_forward_kernel, signature, common,
                      tile.forward_warps))
        for layout, unit_stride in (("nchw", "p"), ("cl", "c")):
            backward = {**common, "KH": 9, "KW": 9, "GRAD_Y": True, "NORM_GRADS": True, "sgo_c": 1,
                        f"sgy_{unit_stride}": 1}
            pointers = {"go_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "w_ptr": "*fp32", "bias_ptr": "*fp32",
                        "nw_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "gy_ptr": f"*{dtype}",
                        "partial_ptr": "*fp32"}
            cases.append((f"backward_{tile.name}_{layout}_{dtype}", _conv_layernorm_backward_kernel,
                          aot_signature(_conv_layernorm_backward_kernel, pointers, backward), backward,
                          tile.backward_warps))
    return cases
