"""Shapes, layouts, dtypes and tolerances shared by the kernel tests of every backend.

Every backend (Triton under the interpreter or on a GPU, the CUDA kernels and their CPU builds) is checked
against a float64 evaluation of :mod:`deco_kernels.reference` on the same inputs, over these lists.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, KERNEL_TARGETS, target_skip_reason

# Where the model-level kernel tests run: CUDA tensors on a GPU machine (where Triton compiles for the GPU and
# its CPU interpreter is off), else CPU tensors (Triton's interpreter, the extension's CPU build).
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"

# KERNEL_TARGETS as ("device, backend") parameters, skipped with the reason where they cannot run.
TARGETS = [
    pytest.param(device, backend, id=f"{device}-{backend}",
                 marks=[pytest.mark.skip(reason=reason)] if (reason := target_skip_reason(device, backend)) else [])
    for device, backend in KERNEL_TARGETS
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Error bound: max |actual - expected| <= TOLERANCE[dtype] * max(1, max |expected|), per output and per
# gradient. The expected value is the float64 reference evaluated on the (already rounded) low-precision
# inputs, so the bound covers one rounding of the output (fp16 2^-11, bf16 2^-8, relative) plus fp32
# accumulation error.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

LAYOUTS = ("contiguous", "channels_last", "strided")

# (B, C, H, W, kh, kw): odd H and W, H or W of 1, maps smaller than the kernel, C not a multiple of any
# block size, B of 1 and 3, kernels 1, 3, 7, 9, 13, 31 and rectangular, and maps spanning several tiles of
# the CUDA kernels (16 x 64 conv, 32 x 32 NCHW and 16 x 32 channels-last weight gradient) with partial tiles on
# both axes and, at 37 x 70, channels-last weight-gradient tiles whose window lies inside the map (unchecked reads).
DEPTHWISE_CASES = [
    (1, 1, 5, 5, 1, 1),
    (3, 5, 7, 9, 3, 3),
    (1, 17, 13, 11, 7, 7),
    (3, 6, 4, 5, 9, 9),
    (1, 4, 1, 12, 9, 9),
    (3, 3, 11, 1, 13, 13),
    (1, 33, 10, 7, 13, 13),
    (2, 9, 6, 15, 3, 7),
    (1, 5, 9, 8, 1, 5),
    (2, 24, 12, 20, 9, 9),
    (1, 3, 6, 5, 31, 31),
    (1, 2, 37, 70, 9, 9),
    (2, 2, 35, 33, 13, 11),
]

# (B, C, H, W, kh, kw) of depthwise_conv2d_layernorm (the LayerNorm runs over C): C of 1 (the output is the
# norm bias), C not a power of two, maps smaller than the kernel, H or W of 1, a rectangular kernel, DECO's
# 10 x 10 query grid with the SIM's 9 x 9, and wide C. These are small, so the CUDA kernel gives them its
# smallest tiles (2 pixels; see DEPTHWISE_LAYERNORM_TILE_CASES for the others); its strips cross image rows
# (H or W of 1, W < tile), end short or run past the image's end; on a 12 x 40 map most strips lie inside the
# image (unchecked reads), and on 20 x 70 so do some of the channels-last weight gradient's tiles.
DEPTHWISE_LAYERNORM_CASES = [
    (1, 1, 5, 5, 3, 3),
    (3, 5, 7, 9, 3, 3),
    (1, 17, 13, 11, 7, 7),
    (2, 6, 4, 5, 9, 9),
    (1, 4, 1, 12, 9, 9),
    (2, 3, 11, 1, 7, 7),
    (2, 9, 6, 15, 3, 7),
    (1, 33, 10, 10, 9, 9),
    (2, 480, 3, 5, 7, 7),
    (1, 1100, 3, 4, 3, 3),
    (2, 24, 12, 40, 7, 7),
    (1, 8, 20, 70, 7, 7),
]

# depthwise_conv2d_layernorm cases big enough for the CUDA kernel's larger tiles (it halves a tile's pixels, from
# as many as fit its buffer, at most 32, down to 2, while a launch would have fewer than 256 tiles): 32 pixels
# whose register-window strips of 8 cross up to three rows of a 5-wide map (lone pixels included); 16 pixels on
# a 64 x 70 map (mostly unchecked reads); 8 pixels at C 480 (DECO's encoder and decoder width); 3 pixels at C 1100.
DEPTHWISE_LAYERNORM_TILE_CASES = [
    (16, 5, 110, 5, 5, 3),
    (1, 100, 64, 70, 7, 7),
    (2, 480, 32, 33, 7, 7),
    (1, 1100, 24, 32, 3, 3),
]

# (B, C, Hq, Wq, H, W, kh, kw): query grid upsampled (or, when smaller, downsampled) to the memory's H x W.
UPSAMPLE_ADD_CONV_CASES = [
    (1, 3, 2, 2, 5, 5, 3, 3),
    (2, 5, 10, 10, 25, 42, 9, 9),
    (1, 7, 3, 4, 7, 9, 9, 9),
    (3, 4, 1, 1, 6, 5, 7, 7),
    (1, 6, 4, 3, 4, 3, 3, 3),
    (2, 9, 5, 5, 13, 11, 9, 9),
    (1, 4, 5, 5, 3, 2, 3, 3),
    (1, 3, 2, 3, 8, 9, 3, 7),
    (1, 17, 10, 10, 1, 12, 13, 13),
]

# (B, C, H, W, out_h, out_w): overlapping windows (H not a multiple of out), output larger than input,
# H or W of 1, DECO's 25 x 42 -> 10 x 10.
ADAPTIVE_POOL_CASES = [
    (1, 3, 25, 42, 10, 10),
    (3, 5, 7, 9, 3, 4),
    (1, 1, 1, 1, 1, 1),
    (2, 6, 10, 10, 10, 10),
    (1, 17, 13, 11, 10, 10),
    (1, 4, 5, 5, 10, 10),
    (2, 3, 1, 17, 1, 5),
    (1, 33, 20, 30, 7, 5),
]


def case_id(case) -> str:
    """A pytest id for a shape tuple, e.g. ``1x3x25x42x10x10``."""
    return "x".join(map(str, case))


def make_input(shape, dtype: torch.dtype, layout: str, device="cpu", generator=None) -> torch.Tensor:
    """A random B x C x H x W tensor in the given layout.

    "strided" is a non-contiguous view (every other column of a wider tensor), which is neither NCHW- nor
    channels-last-contiguous.
    """
    b, c, h, w = shape
    if layout == "strided":
        wide = torch.randn(b, c, h, 2 * w, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        return wide[..., ::2]
    x = torch.randn(b, c, h, w, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "contiguous":
        return x
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Check ``actual`` against a float64 ``expected`` with the bound of :data:`TOLERANCE`."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual64 = actual.detach().to(torch.float64).cpu()
    expected64 = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(actual64).all(), f"{what}: non-finite values (unwritten output?)"
    scale = max(1.0, expected64.abs().max().item()) if expected64.numel() else 1.0
    error = (actual64 - expected64).abs().max().item() if expected64.numel() else 0.0
    bound = TOLERANCE[dtype] * scale
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} ({dtype}, scale {scale:.3g})"


def forbid_kernel_launches(monkeypatch, module, names) -> None:
    """Replace the Triton kernels ``names`` of ``module`` with stand-ins that fail the test when launched."""

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"a kernel was launched (grid {grid}) where nothing should run")

    for name in names:
        monkeypatch.setattr(module, name, NoLaunch())
