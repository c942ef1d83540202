"""deco_kernels.depthwise_conv2d_layernorm against a float64 reference: forward and the gradients of x, weight,
bias, norm_weight and norm_bias, every input layout and dtype.

Without a GPU the "triton" backend runs in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1) and "cuda" runs the CPU build of the CUDA kernels when deco_kernels._C is built; with a GPU
the same tests run on CUDA tensors. Every buffer the Triton launchers allocate is filled with NaN first
(``poisoned_outputs``), so an element a kernel does not write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    DEPTHWISE_LAYERNORM_CASES, DTYPES, KERNEL_DEVICE, LAYOUTS, assert_close, case_id, make_input,
)
from test_depthwise_conv2d import TARGETS, check_op_against_reference, check_parameter_gradient_dtypes

import deco_kernels
from deco_kernels import reference
from deco_kernels.ops._common import MAX_LAYERNORM_CHANNELS, poisoned_outputs
from deco_kernels.triton import depthwise_conv2d_layernorm as triton_fused

# The output gradient's layout for each input layout (B x H x W x C; make_input's "channels_last" of it is a
# permuted, non-contiguous tensor), so that backward also reads gradients that are not dense BHWC.
GRAD_LAYOUT = {"contiguous": "channels_last", "channels_last": "contiguous", "strided": "strided"}


def make_parameters(channels, kh, kw, device, bias=True):
    """(weight C x 1 x kh x kw, bias C or None, norm_weight C, norm_bias C), float32."""
    weight = torch.randn(channels, 1, kh, kw, device=device)
    conv_bias = torch.randn(channels, device=device) if bias else None
    norm_weight = 1 + 0.5 * torch.randn(channels, device=device)
    norm_bias = 0.5 * torch.randn(channels, device=device)
    return weight, conv_bias, norm_weight, norm_bias


def fused(backend):
    def op(x, weight, bias, norm_weight, norm_bias):
        return deco_kernels.depthwise_conv2d_layernorm(x, weight, bias, norm_weight, norm_bias, backend=backend)

    return op


def check_case(case, dtype, layout, device, backend, grad_layout):
    batch, channels, height, width, kh, kw = case
    x = make_input((batch, channels, height, width), dtype, layout, device=device)
    check_op_against_reference(
        fused(backend), reference.depthwise_conv2d_layernorm, [x], list(make_parameters(channels, kh, kw, device)),
        dtype, grad_layout=grad_layout, output_format=torch.contiguous_format,
    )


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DEPTHWISE_LAYERNORM_CASES, ids=case_id)
def test_matches_reference_fp32(case, layout, device, backend):
    check_case(case, torch.float32, layout, device, backend, GRAD_LAYOUT[layout])


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("case", [DEPTHWISE_LAYERNORM_CASES[i] for i in (1, 3, 7)], ids=case_id)
def test_matches_reference_low_precision(case, dtype, layout, device, backend):
    check_case(case, dtype, layout, device, backend, "contiguous")


def test_every_channel_count_has_a_tile():
    """One GPU tile per power of two from 16 to MAX_LAYERNORM_CHANNELS, the widest channel count the op takes."""
    assert [tile.block_c for tile in triton_fused.TILES] == [16 << i for i in range(len(triton_fused.TILES))]
    assert triton_fused.TILES[-1].block_c == MAX_LAYERNORM_CHANNELS


@pytest.mark.parametrize("tile", triton_fused.TILES, ids=lambda t: t.name)
def test_every_gpu_tile(tile, monkeypatch):
    """Each GPU tile, forced under the interpreter: C just over half the tile, three pixel blocks per image,
    and backward programs that each loop over a run of five pixel blocks crossing an image boundary (the last
    run shorter), so the norm gradients are summed from two partial rows."""
    monkeypatch.setattr(triton_fused, "pixel_tile", lambda x: tile)
    monkeypatch.setattr(triton_fused, "_MAX_PARTIAL_ROWS", 2)
    channels = tile.block_c // 2 + 3
    width = 2 * tile.block_p // 3 + 1
    layout = ("contiguous", "channels_last")[triton_fused.TILES.index(tile) % 2]
    x = make_input((3, channels, 3, width), torch.float32, layout, device=KERNEL_DEVICE)
    parameters = list(make_parameters(channels, 3, 5, KERNEL_DEVICE))
    check_op_against_reference(
        fused("triton"), reference.depthwise_conv2d_layernorm, [x], parameters,
        torch.float32, output_format=torch.contiguous_format,
    )


@pytest.mark.parametrize("device, backend", TARGETS)
def test_expanded_output_gradient(device, backend):
    """The gradient of .sum() is a stride-0 expanded tensor; backward must not read it as dense memory."""
    x = make_input((2, 5, 7, 6), torch.float32, "channels_last", device=device)
    params = make_parameters(5, 3, 5, device)
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    deco_kernels.depthwise_conv2d_layernorm(*leaves, backend=backend).sum().backward()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *params)]
    reference.depthwise_conv2d_layernorm(*leaves64).sum().backward()
    for name, leaf, leaf64 in zip(("x", "weight", "bias", "norm_weight", "norm_bias"), leaves, leaves64):
        assert_close(leaf.grad, leaf64.grad, torch.float32, f"gradient of {name}")


@pytest.mark.parametrize("device, backend", TARGETS)
def test_no_bias_and_partial_gradients(device, backend):
    """A missing conv bias is fine; only the gradients autograd asks for are computed."""
    x = make_input((2, 6, 5, 4), torch.float32, "contiguous", device=device)
    weight, _, norm_weight, norm_bias = make_parameters(6, 3, 3, device, bias=False)
    check_op_against_reference(
        fused(backend), reference.depthwise_conv2d_layernorm, [x], [weight, None, norm_weight, norm_bias],
        torch.float32, output_format=torch.contiguous_format,
    )
    for wanted in ({"norm_weight"}, {"x", "norm_bias"}, {"weight"}):
        leaves = {"x": x.clone(), "weight": weight.clone(), "norm_weight": norm_weight.clone(),
                  "norm_bias": norm_bias.clone()}
        for name in wanted:
            leaves[name].requires_grad_()
        out = deco_kernels.depthwise_conv2d_layernorm(
            leaves["x"], leaves["weight"], None, leaves["norm_weight"], leaves["norm_bias"], backend=backend)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        leaves64 = {name: t.detach().double().requires_grad_(name in wanted) for name, t in leaves.items()}
        reference.depthwise_conv2d_layernorm(
            leaves64["x"], leaves64["weight"], None, leaves64["norm_weight"], leaves64["norm_bias"]
        ).backward(grad_out.double())
        for name, leaf in leaves.items():
            if name in wanted:
                assert_close(leaf.grad, leaves64[name].grad, torch.float32, f"gradient of {name} ({wanted})")
            else:
                assert leaf.grad is None, f"{name} got a gradient it did not ask for ({wanted})"


@pytest.mark.parametrize("device, backend", TARGETS)
def test_parameters_in_other_dtypes_get_gradients_in_their_dtype(device, backend):
    """fp16/bf16/fp64 conv and LayerNorm parameters (see check_parameter_gradient_dtypes)."""
    x = make_input((2, 7, 6, 5), torch.float32, "channels_last", device=device)
    dtypes = (torch.float16, torch.bfloat16, torch.float64, torch.bfloat16)
    params = [p.to(dtype) for p, dtype in zip(make_parameters(7, 5, 3, device), dtypes)]
    check_parameter_gradient_dtypes(
        lambda *args: deco_kernels.depthwise_conv2d_layernorm(*args, backend=backend),
        reference.depthwise_conv2d_layernorm, [x], params,
    )


@pytest.mark.parametrize("device, backend", TARGETS)
def test_gradients_are_deterministic(device, backend):
    x = make_input((3, 24, 12, 20), torch.float32, "channels_last", device=device)
    params = make_parameters(24, 7, 7, device)
    grad_out = torch.randn(3, 12, 20, 24, device=device)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        out = deco_kernels.depthwise_conv2d_layernorm(*leaves, backend=backend)
        out.backward(grad_out)
        runs.append([out] + [leaf.grad for leaf in leaves])
    for index, (first, second) in enumerate(zip(*runs)):
        assert torch.equal(first, second), f"output/gradient {index} differs between two identical runs"


@pytest.mark.parametrize("device, backend", TARGETS)
def test_empty_batch(device, backend):
    x = torch.randn(0, 4, 6, 5, device=device, requires_grad=True)
    params = [t.requires_grad_() for t in make_parameters(4, 3, 3, device)]
    with poisoned_outputs():
        out = deco_kernels.depthwise_conv2d_layernorm(x, *params, backend=backend)
        assert out.shape == (0, 6, 5, 4)
        out.sum().backward()
    assert x.grad.shape == x.shape
    for param in params:
        assert torch.equal(param.grad, torch.zeros_like(param)), "a parameter of an empty batch has a gradient"


def test_primitives_write_every_element_of_their_outputs():
    """The Triton launcher contract directly: poisoned outputs come back finite, in the documented layouts."""
    x = make_input((2, 17, 9, 10), torch.bfloat16, "channels_last", device=KERNEL_DEVICE)
    weight, bias, norm_weight, norm_bias = make_parameters(17, 7, 3, KERNEL_DEVICE)
    with poisoned_outputs():
        out, mean, rstd = triton_fused.depthwise_conv2d_layernorm_forward(x, weight, bias, norm_weight, norm_bias,
                                                                          1e-6)
        grads = triton_fused.depthwise_conv2d_layernorm_backward(
            torch.randn_like(out), x, weight, bias, norm_weight, mean, rstd, [True] * 5)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 9, 10, 17) and out.is_contiguous()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (2, 9, 10)
    grad_x, grad_weight, grad_bias, grad_norm_weight, _ = grads
    assert grad_x.dtype == torch.bfloat16 and grad_x.is_contiguous(memory_format=torch.channels_last)
    assert grad_weight.shape == weight.shape and grad_bias.shape == grad_norm_weight.shape == (17,)
    for t in (out, mean, rstd, *grads):
        assert torch.isfinite(t).all()
    for t in grads[1:]:
        assert t.dtype == torch.float32
    only_norm = triton_fused.depthwise_conv2d_layernorm_backward(
        torch.randn_like(out), x, weight, bias, norm_weight, mean, rstd, [False, False, False, True, False])
    assert [t is None for t in only_norm] == [True, True, True, False, True]
    assert only_norm[3].shape == (17,) and torch.isfinite(only_norm[3]).all()


def test_saved_statistics_are_those_of_the_conv_output():
    """mean and rstd saved for backward: the per-pixel LayerNorm statistics of the conv output (B x H x W)."""
    x = make_input((2, 9, 5, 7), torch.float32, "contiguous", device=KERNEL_DEVICE)
    weight, bias, norm_weight, norm_bias = make_parameters(9, 5, 5, KERNEL_DEVICE)
    _, mean, rstd = torch.ops.deco_kernels.depthwise_conv2d_layernorm(
        x, weight, bias, norm_weight, norm_bias, 1e-6, "triton")
    y = reference.depthwise_conv2d(x.double(), weight.double(), bias.double())
    assert_close(mean, y.mean(dim=1), torch.float32, "mean")
    assert_close(rstd, (y.var(dim=1, unbiased=False) + 1e-6).rsqrt(), torch.float32, "rstd")


def _arguments(x_shape=(1, 3, 5, 5), channels=3, kernel=(3, 3)):
    return [torch.randn(*x_shape), torch.randn(channels, 1, *kernel), torch.randn(channels), torch.randn(channels),
            torch.randn(channels)]


def _with(index, value, **shape):
    def make():
        args = _arguments(**shape)
        args[index] = value(args[index]) if callable(value) else value
        return args

    return make


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (_with(0, lambda x: x[0]), ValueError, r"x must be 4-D"),
        (_with(0, lambda x: x.double()), TypeError, r"x must be float32, float16 or bfloat16"),
        (_with(1, torch.randn(4, 1, 3, 3)), ValueError, r"weight has 4 channels but the input has 3"),
        (_with(1, torch.randn(3, 1, 4, 3)), ValueError, r"kernel size must be odd"),
        (_with(1, lambda w: w.to("meta")), ValueError, r"weight must be on the same device"),
        (_with(2, torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
        (_with(3, torch.randn(4)), ValueError, r"norm_weight must have shape \(3,\)"),
        (_with(3, lambda w: w.to("meta")), ValueError, r"norm_weight must be on the same device"),
        (_with(4, lambda b: b.long()), TypeError, r"norm_bias must be floating point"),
        (_with(4, None), TypeError, r"norm_bias must be a torch.Tensor"),
        (_with(0, torch.randn(1, MAX_LAYERNORM_CHANNELS + 1, 1, 1), channels=MAX_LAYERNORM_CHANNELS + 1,
               x_shape=(1, 1, 1, 1)), ValueError, rf"1\.\.{MAX_LAYERNORM_CHANNELS} channels"),
    ],
    ids=["3d", "float64", "channels", "even", "weight-device", "bias-shape", "norm-weight-shape",
         "norm-weight-device", "norm-bias-dtype", "norm-bias-none", "too-many-channels"],
)
def test_bad_inputs_are_named(make_args, error, match):
    with pytest.raises(error, match=match):
        deco_kernels.depthwise_conv2d_layernorm(*make_args(), backend="triton")


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), "1e-6", True])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        deco_kernels.depthwise_conv2d_layernorm(*_arguments(), eps=eps, backend="triton")


def test_torch_backend_is_the_reference():
    args = [a.to(KERNEL_DEVICE) for a in _arguments((2, 3, 6, 5))]
    out = deco_kernels.depthwise_conv2d_layernorm(*args, eps=1e-3, backend="torch")
    assert out.is_contiguous() and out.shape == (2, 6, 5, 3)
    assert torch.equal(out, reference.depthwise_conv2d_layernorm(*args, eps=1e-3))
    assert_close(deco_kernels.depthwise_conv2d_layernorm(*args, eps=1e-3, backend="triton"), out, torch.float32,
                 "triton vs torch with eps 1e-3")
