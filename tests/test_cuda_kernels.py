"""The CUDA kernels of csrc/ (``deco_kernels._cuda`` primitives) against the float64 reference.

On CPU tensors the primitives run the CPU builds of the same kernel bodies (csrc/kernel_math.h), which is
what CI exercises; with a GPU the same tests run on CUDA tensors and are compared with the Triton backend.
Outputs are poisoned: ``torch.use_deterministic_algorithms(True)`` makes every ``at::empty`` the kernels
allocate start as NaN (integers as INT64_MAX), so an element a kernel fails to write fails the check.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from deco_kernels import _cuda, reference
from tests.conftest import HAS_CUDA, requires_cuda
from tests.kernel_cases import (
    ADAPTIVE_POOL_CASES,
    DEPTHWISE_CASES,
    DEPTHWISE_LAYERNORM_CASES,
    DEPTHWISE_LAYERNORM_TILE_CASES,
    DTYPES,
    LAYOUTS,
    TOLERANCE,
    UPSAMPLE_ADD_CONV_CASES,
    assert_close,
    make_input,
)

pytestmark = pytest.mark.skipif(not _cuda.is_available(), reason=f"deco_kernels._C is not built: {_cuda.load_error()}")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Low-precision dtypes run on a subset of the cases (fp32 covers every case and layout).
DEPTHWISE_LOW_PRECISION = [DEPTHWISE_CASES[i] for i in (1, 3, 9, 11)]
UPSAMPLE_LOW_PRECISION = [UPSAMPLE_ADD_CONV_CASES[i] for i in (1, 4, 7)]
POOL_LOW_PRECISION = [ADAPTIVE_POOL_CASES[i] for i in (0, 1, 4)]
LAYERNORM_LOW_PRECISION = [DEPTHWISE_LAYERNORM_CASES[i] for i in (1, 3, 7, 11)]


@pytest.fixture(autouse=True)
def _poison_outputs():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.empty(4).isnan().all(), "at::empty is not poisoned: the unwritten-output checks would be blind"
    yield
    torch.use_deterministic_algorithms(previous)


def _cases(cases, low_precision_cases):
    params = [
        pytest.param(case, torch.float32, layout, id=f"{case}-float32-{layout}") for case in cases for layout in LAYOUTS
    ]
    params += [
        pytest.param(case, dtype, layout, id=f"{case}-{str(dtype)[6:]}-{layout}")
        for case in low_precision_cases
        for dtype in LOW_PRECISION
        for layout in ("contiguous", "channels_last")
    ]
    return params


def _parameters(channels, kh, kw, device):
    weight = torch.randn(channels, 1, kh, kw, device=device) / (kh * kw) ** 0.5
    bias = torch.randn(channels, device=device)
    return weight, bias


def _reference_grads(fn, inputs, grad_out):
    """Float64 output of fn and the grads of every input."""
    leaves = [t.detach().to(torch.float64).cpu().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.detach().to(torch.float64).cpu())
    return out.detach(), grads


def _expected_format(t: torch.Tensor, layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" and t.shape[1] > 1 else torch.contiguous_format


# --------------------------------------------------------------------------------------------------------
# depthwise_conv2d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, dtype, layout", _cases(DEPTHWISE_CASES, DEPTHWISE_LOW_PRECISION))
def test_depthwise_conv2d_matches_reference(case, dtype, layout, device):
    b, c, h, w, kh, kw = case
    x = make_input((b, c, h, w), dtype, layout, device)
    weight, bias = _parameters(c, kh, kw, device)
    grad_y = make_input((b, c, h, w), dtype, layout, device)

    y = _cuda.depthwise_conv2d_forward(x, weight, bias)
    grad_x, grad_weight, grad_bias = _cuda.depthwise_conv2d_backward(grad_y, x, weight, [True, True, True])

    y_ref, (gx_ref, gw_ref, gb_ref) = _reference_grads(reference.depthwise_conv2d, (x, weight, bias), grad_y)
    assert y.dtype == dtype and y.device == x.device
    assert y.is_contiguous(memory_format=_expected_format(x, layout))
    assert grad_weight.dtype == torch.float32 and grad_bias.dtype == torch.float32
    assert_close(y, y_ref, dtype, "y")
    assert_close(grad_x, gx_ref, dtype, "grad_x")
    assert_close(grad_weight, gw_ref, dtype, "grad_weight")
    assert_close(grad_bias, gb_ref, dtype, "grad_bias")


@pytest.mark.parametrize("device", DEVICES)
def test_depthwise_conv2d_without_bias_and_partial_mask(device):
    x = make_input((2, 5, 9, 11), torch.float32, "contiguous", device)
    weight, _ = _parameters(5, 7, 7, device)
    grad_y = torch.randn_like(x)
    y_ref, (gx_ref, gw_ref) = _reference_grads(lambda x, w: reference.depthwise_conv2d(x, w), (x, weight), grad_y)
    assert_close(_cuda.depthwise_conv2d_forward(x, weight, None), y_ref, torch.float32, "y")

    grad_x, grad_weight, grad_bias = _cuda.depthwise_conv2d_backward(grad_y, x, weight, [True, False, False])
    assert grad_weight is None and grad_bias is None
    assert_close(grad_x, gx_ref, torch.float32, "grad_x")
    grad_x, grad_weight, grad_bias = _cuda.depthwise_conv2d_backward(grad_y, x, weight, [False, True, False])
    assert grad_x is None and grad_bias is None
    assert_close(grad_weight, gw_ref, torch.float32, "grad_weight")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_depthwise_conv2d_expanded_grad(layout, device):
    """grad_y of ``y.sum()`` is an expanded, stride-0 tensor; the kernels must not read it as contiguous."""
    x = make_input((2, 3, 6, 7), torch.float32, layout, device)
    weight, bias = _parameters(3, 3, 5, device)
    grad_y = torch.ones((), device=device).expand_as(x)
    _, (gx_ref, gw_ref, gb_ref) = _reference_grads(reference.depthwise_conv2d, (x, weight, bias), grad_y)
    grad_x, grad_weight, grad_bias = _cuda.depthwise_conv2d_backward(grad_y, x, weight, [True, True, True])
    assert_close(grad_x, gx_ref, torch.float32, "grad_x")
    assert_close(grad_weight, gw_ref, torch.float32, "grad_weight")
    assert_close(grad_bias, gb_ref, torch.float32, "grad_bias")


@pytest.mark.parametrize("device", DEVICES)
def test_depthwise_conv2d_empty_batch(device):
    x = torch.randn(0, 4, 5, 6, device=device)
    weight, bias = _parameters(4, 3, 3, device)
    y = _cuda.depthwise_conv2d_forward(x, weight, bias)
    assert y.shape == x.shape
    grad_x, grad_weight, grad_bias = _cuda.depthwise_conv2d_backward(torch.randn_like(x), x, weight, [True] * 3)
    assert grad_x.shape == x.shape
    assert torch.equal(grad_weight, torch.zeros_like(weight)) and torch.equal(grad_bias, torch.zeros_like(bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weight_grads_are_deterministic(layout, device):
    x = make_input((3, 4, 37, 70), torch.float32, layout, device)  # several gradient tiles per image
    weight, _ = _parameters(4, 9, 9, device)
    grad_y = torch.randn_like(x)
    first = _cuda.depthwise_conv2d_backward(grad_y, x, weight, [True, True, True])
    second = _cuda.depthwise_conv2d_backward(grad_y, x, weight, [True, True, True])
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    query = torch.randn(3, 4, 10, 10, device=device)
    first = _cuda.upsample_add_conv_backward(grad_y, query, x, weight, [True] * 4)
    second = _cuda.upsample_add_conv_backward(grad_y, query, x, weight, [True] * 4)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# Channels-last weight-gradient tiles lose rows (16 -> 8 -> 4 -> 2) until the pass has 2^17 threads (one per
# tile, tap unit and channel; a 31 x 1 kernel has 31 units). On 1 x C x 20 x 40 that gives 16-row tiles at C 1100
# (4 tiles), 8-row ones at C 800 (6 tiles) and 4-row ones at C 500 (10 tiles); the small cases above get 2-row ones.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1100, 800, 500])
def test_channels_last_weight_grad_with_every_tile_height(channels, device):
    x, grad_y = (make_input((1, channels, 20, 40), torch.float32, "channels_last", device) for _ in range(2))
    weight, bias = _parameters(channels, 31, 1, device)
    _, (_, gw_ref, gb_ref) = _reference_grads(reference.depthwise_conv2d, (x, weight, bias), grad_y)
    _, grad_weight, grad_bias = _cuda.depthwise_conv2d_backward(grad_y, x, weight, [False, True, True])
    assert_close(grad_weight, gw_ref, torch.float32, "grad_weight")
    assert_close(grad_bias, gb_ref, torch.float32, "grad_bias")
    query = make_input((1, channels, 10, 10), torch.float32, "channels_last", device)
    _, (_, _, gw_ref, gb_ref) = _reference_grads(reference.upsample_add_conv, (query, x, weight, bias), grad_y)
    mask = [False, False, True, True]
    _, _, grad_weight, grad_bias = _cuda.upsample_add_conv_backward(grad_y, query, x, weight, mask)
    assert_close(grad_weight, gw_ref, torch.float32, "grad_weight of upsample_add_conv")
    assert_close(grad_bias, gb_ref, torch.float32, "grad_bias of upsample_add_conv")


def _activation_copies(run, shape) -> list[str]:
    """The copy ops ``run()`` makes of a tensor of ``shape`` (as the profiler records them inside the primitives)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        run()
    return [event.name for event in profile.events()
            if event.name in ("aten::copy_", "aten::clone", "aten::_to_copy")
            and any(list(input_shape) == list(shape) for input_shape in event.input_shapes)]


@pytest.mark.parametrize("op", ["depthwise_conv2d", "upsample_add_conv", "depthwise_conv2d_layernorm"])
def test_channels_last_backward_copies_no_activation(op):
    """Channels-last x, memory and grad y are read where they are, the weight gradient included."""
    shape = (2, 6, 9, 11)
    x, grad_y = (make_input(shape, torch.float32, "channels_last") for _ in range(2))
    weight, bias = _parameters(6, 7, 7, "cpu")
    if op == "depthwise_conv2d":
        def run():
            _cuda.depthwise_conv2d_backward(grad_y, x, weight, [True] * 3)
    elif op == "upsample_add_conv":
        query = make_input((2, 6, 4, 5), torch.float32, "channels_last")

        def run():
            _cuda.upsample_add_conv_backward(grad_y, query, x, weight, [True] * 4)
    else:
        norm_weight, norm_bias = torch.randn(6), torch.randn(6)
        _, mean, rstd = _cuda.depthwise_conv2d_layernorm_forward(x, weight, bias, norm_weight, norm_bias, 1e-6)
        grad_out = grad_y.permute(0, 2, 3, 1)  # B x H x W x C contiguous

        def run():
            _cuda.depthwise_conv2d_layernorm_backward(grad_out, x, weight, bias, norm_weight, mean, rstd, [True] * 5)
    assert _activation_copies(run, shape) == []
    # The check sees copies: NCHW grad y with channels-last x is copied once, to x's format.
    assert _activation_copies(lambda: _cuda.depthwise_conv2d_backward(grad_y.contiguous(), x, weight, [True] * 3),
                              shape) != []


# --------------------------------------------------------------------------------------------------------
# upsample_add_conv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, dtype, layout", _cases(UPSAMPLE_ADD_CONV_CASES, UPSAMPLE_LOW_PRECISION))
def test_upsample_add_conv_matches_reference(case, dtype, layout, device):
    b, c, hq, wq, h, w, kh, kw = case
    query = make_input((b, c, hq, wq), dtype, layout, device)
    memory = make_input((b, c, h, w), dtype, layout, device)
    weight, bias = _parameters(c, kh, kw, device)
    grad_y = make_input((b, c, h, w), dtype, layout, device)

    y = _cuda.upsample_add_conv_forward(query, memory, weight, bias)
    grads = _cuda.upsample_add_conv_backward(grad_y, query, memory, weight, [True] * 4)

    y_ref, grads_ref = _reference_grads(reference.upsample_add_conv, (query, memory, weight, bias), grad_y)
    assert y.dtype == dtype and y.is_contiguous(memory_format=_expected_format(memory, layout))
    assert_close(y, y_ref, dtype, "y")
    for name, grad, grad_ref in zip(("grad_query", "grad_memory", "grad_weight", "grad_bias"), grads, grads_ref):
        assert_close(grad, grad_ref, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True, False, False, False], [False, True, False, False], [False, False, True, True]])
def test_upsample_add_conv_partial_mask_and_expanded_grad(mask, device):
    query = torch.randn(2, 3, 4, 4, device=device)
    memory = torch.randn(2, 3, 9, 10, device=device)
    weight, bias = _parameters(3, 5, 5, device)
    grad_y = torch.ones((), device=device).expand_as(memory)
    _, grads_ref = _reference_grads(reference.upsample_add_conv, (query, memory, weight, bias), grad_y)
    grads = _cuda.upsample_add_conv_backward(grad_y, query, memory, weight, mask)
    for wanted, grad, grad_ref in zip(mask, grads, grads_ref):
        if wanted:
            assert_close(grad, grad_ref, torch.float32, "grad")
        else:
            assert grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_upsample_add_conv_empty_batch(device):
    query, memory = torch.randn(0, 3, 2, 2, device=device), torch.randn(0, 3, 5, 5, device=device)
    weight, bias = _parameters(3, 3, 3, device)
    assert _cuda.upsample_add_conv_forward(query, memory, weight, bias).shape == memory.shape
    grads = _cuda.upsample_add_conv_backward(torch.randn_like(memory), query, memory, weight, [True] * 4)
    assert grads[0].shape == query.shape and grads[1].shape == memory.shape
    assert torch.equal(grads[2], torch.zeros_like(weight)) and torch.equal(grads[3], torch.zeros_like(bias))


# --------------------------------------------------------------------------------------------------------
# depthwise_conv2d_layernorm


def _layernorm_parameters(channels, kh, kw, device, bias=True):
    """(weight, conv bias or None, norm_weight, norm_bias), float32."""
    weight, conv_bias = _parameters(channels, kh, kw, device)
    norm_weight = 1 + 0.5 * torch.randn(channels, device=device)
    return weight, conv_bias if bias else None, norm_weight, 0.5 * torch.randn(channels, device=device)


def _check_layernorm(x, params, grad_out, dtype, layout="contiguous", what=""):
    """Forward (out, saved mean and rstd) and every gradient of the primitives against float64."""
    weight, bias, norm_weight, norm_bias = params
    out, mean, rstd = _cuda.depthwise_conv2d_layernorm_forward(x, *params, 1e-6)
    grads = _cuda.depthwise_conv2d_layernorm_backward(
        grad_out, x, weight, bias, norm_weight, mean, rstd, [True, True, bias is not None, True, True])
    leaves = {"x": x, "weight": weight, "bias": bias, "norm_weight": norm_weight, "norm_bias": norm_bias}
    present = [name for name, t in leaves.items() if t is not None]

    def fn(*tensors):
        args = dict(zip(present, tensors))
        return reference.depthwise_conv2d_layernorm(args["x"], args["weight"], args.get("bias"),
                                                    args["norm_weight"], args["norm_bias"])

    out_ref, grads_ref = _reference_grads(fn, [leaves[name] for name in present], grad_out)
    y = reference.depthwise_conv2d(*(None if t is None else t.double().cpu() for t in (x, weight, bias)))
    assert out.dtype == dtype and out.is_contiguous()
    assert mean.dtype == rstd.dtype == torch.float32
    assert_close(out, out_ref, dtype, f"out{what}")
    assert_close(mean, y.mean(dim=1), dtype, f"mean{what}")
    assert_close(rstd, (y.var(dim=1, unbiased=False) + 1e-6).rsqrt(), dtype, f"rstd{what}")
    assert grads[0].dtype == dtype and grads[0].is_contiguous(memory_format=_expected_format(x, layout))
    expected = dict(zip(present, grads_ref))
    for name, grad in zip(leaves, grads):
        if name not in expected:
            assert grad is None, f"{name}: a gradient for a missing input{what}"
            continue
        assert name == "x" or grad.dtype == torch.float32, name
        assert_close(grad, expected[name], dtype, f"gradient of {name}{what}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case, dtype, layout",
    _cases(DEPTHWISE_LAYERNORM_CASES, LAYERNORM_LOW_PRECISION)
    + [pytest.param(case, torch.float32, layout, id=f"{case}-tiles-{layout}")
       for case in DEPTHWISE_LAYERNORM_TILE_CASES for layout in ("contiguous", "channels_last")],
)
def test_depthwise_conv2d_layernorm_matches_reference(case, dtype, layout, device):
    b, c, h, w, kh, kw = case
    x = make_input((b, c, h, w), dtype, layout, device)
    # grad_out: B x H x W x C, dense or (for NCHW x) a non-contiguous view.
    grad_out = make_input((b, h, w, c), dtype, "contiguous" if layout == "channels_last" else layout, device)
    _check_layernorm(x, _layernorm_parameters(c, kh, kw, device), grad_out, dtype, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels, height, width", [(600, 25, 31), (2048, 3, 5)])
def test_depthwise_conv2d_layernorm_wide_channels(channels, height, width, device):
    """Tiles of 6 and 2 pixels (as many as fit the block's buffer): several per image, crossing rows."""
    x = make_input((2, channels, height, width), torch.float32, "channels_last", device)
    grad_out = torch.randn(2, height, width, channels, device=device)
    _check_layernorm(x, _layernorm_parameters(channels, 3, 3, device), grad_out, torch.float32, "channels_last")


@pytest.mark.parametrize("device", DEVICES)
def test_depthwise_conv2d_layernorm_no_bias_partial_mask_expanded_grad(device):
    x = make_input((2, 5, 9, 11), torch.float32, "contiguous", device)
    params = _layernorm_parameters(5, 7, 7, device, bias=False)
    grad_out = torch.ones((), device=device).expand(2, 9, 11, 5)
    _check_layernorm(x, params, grad_out, torch.float32, what=" (no bias, expanded grad_out)")
    _, mean, rstd = _cuda.depthwise_conv2d_layernorm_forward(x, *params, 1e-6)
    full = _cuda.depthwise_conv2d_layernorm_backward(grad_out, x, *params[:3], mean, rstd, [True] * 5)
    for mask in ([False, False, False, True, False], [True, False, False, False, False], [False, True, False, False,
                                                                                           True]):
        grads = _cuda.depthwise_conv2d_layernorm_backward(grad_out, x, *params[:3], mean, rstd, mask)
        for wanted, grad, expected in zip(mask, grads, full):
            if wanted:
                assert torch.equal(grad, expected), f"{mask}: a partial mask changed a gradient"
            else:
                assert grad is None, f"{mask}: an unrequested gradient was computed"


@pytest.mark.parametrize("device", DEVICES)
def test_depthwise_conv2d_layernorm_empty_batch_and_determinism(device):
    x = torch.randn(0, 4, 5, 6, device=device)
    params = _layernorm_parameters(4, 3, 3, device)
    out, mean, rstd = _cuda.depthwise_conv2d_layernorm_forward(x, *params, 1e-6)
    assert out.shape == (0, 5, 6, 4) and mean.shape == rstd.shape == (0, 5, 6)
    grads = _cuda.depthwise_conv2d_layernorm_backward(torch.randn(0, 5, 6, 4, device=device), x, *params[:3], mean,
                                                      rstd, [True] * 5)
    assert grads[0].shape == x.shape
    for grad, param in zip(grads[1:], params):
        assert torch.equal(grad, torch.zeros_like(param))

    x = make_input((3, 24, 12, 20), torch.float32, "channels_last", device)
    params = _layernorm_parameters(24, 7, 7, device)
    grad_out = torch.randn(3, 12, 20, 24, device=device)
    runs = []
    for _ in range(2):
        out, mean, rstd = _cuda.depthwise_conv2d_layernorm_forward(x, *params, 1e-6)
        runs.append([out, *_cuda.depthwise_conv2d_layernorm_backward(grad_out, x, *params[:3], mean, rstd, [True] * 5)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_depthwise_conv2d_layernorm_rejects_bad_input():
    x, weight, bias = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(4)
    norm_weight, norm_bias = torch.randn(4), torch.randn(4)
    forward = _cuda.depthwise_conv2d_layernorm_forward
    with pytest.raises(RuntimeError, match="x must have 1..2048 channels"):
        forward(torch.randn(1, 2049, 2, 2), torch.randn(2049, 1, 3, 3), None, torch.randn(2049), torch.randn(2049),
                1e-6)
    with pytest.raises(RuntimeError, match=r"norm_weight must have shape \(4,\)"):
        forward(x, weight, bias, torch.randn(5), norm_bias, 1e-6)
    with pytest.raises(RuntimeError, match="norm_bias must be float32"):
        forward(x, weight, bias, norm_weight, norm_bias.double(), 1e-6)
    with pytest.raises(RuntimeError, match="weight has 4 channels but x has 3"):
        forward(torch.randn(2, 3, 5, 5), weight, None, norm_weight[:3], norm_bias[:3], 1e-6)
    _, mean, rstd = forward(x, weight, bias, norm_weight, norm_bias, 1e-6)
    backward = _cuda.depthwise_conv2d_layernorm_backward
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[2, 5, 5, 4\]"):
        backward(torch.randn(2, 4, 5, 5), x, weight, bias, norm_weight, mean, rstd, [True] * 5)
    with pytest.raises(RuntimeError, match="mean must be a float32 tensor"):
        backward(torch.randn(2, 5, 5, 4), x, weight, bias, norm_weight, mean.double(), rstd, [True] * 5)
    with pytest.raises(RuntimeError, match=r"rstd must have shape \[2, 5, 5\]"):
        backward(torch.randn(2, 5, 5, 4), x, weight, bias, norm_weight, mean, rstd[:, :4], [True] * 5)


# --------------------------------------------------------------------------------------------------------
# adaptive pools


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, dtype, layout", _cases(ADAPTIVE_POOL_CASES, POOL_LOW_PRECISION))
def test_adaptive_max_pool2d_matches_torch(case, dtype, layout, device):
    b, c, h, w, oh, ow = case
    x = make_input((b, c, h, w), dtype, layout, device)
    grad_y = make_input((b, c, oh, ow), dtype, layout, device)
    y, indices = _cuda.adaptive_max_pool2d_forward(x, (oh, ow))
    y_ref, indices_ref = reference.adaptive_max_pool2d(x.detach().double().cpu(), (oh, ow), return_indices=True)
    assert y.is_contiguous(memory_format=_expected_format(x, layout)) and indices.dtype == torch.int64
    assert torch.equal(indices.cpu(), indices_ref)
    assert_close(y, y_ref, dtype, "y")
    grad_x = _cuda.adaptive_max_pool2d_backward(grad_y, indices, (h, w))
    _, (gx_ref,) = _reference_grads(lambda t: reference.adaptive_max_pool2d(t, (oh, ow)), (x,), grad_y)
    assert grad_x.dtype == dtype and grad_x.is_contiguous(memory_format=_expected_format(grad_y, layout))
    assert_close(grad_x, gx_ref, dtype, "grad_x")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, dtype, layout", _cases(ADAPTIVE_POOL_CASES, POOL_LOW_PRECISION))
def test_adaptive_avg_pool2d_matches_reference(case, dtype, layout, device):
    b, c, h, w, oh, ow = case
    x = make_input((b, c, h, w), dtype, layout, device)
    grad_y = make_input((b, c, oh, ow), dtype, layout, device)
    y = _cuda.adaptive_avg_pool2d_forward(x, (oh, ow))
    grad_x = _cuda.adaptive_avg_pool2d_backward(grad_y, (h, w))
    y_ref, (gx_ref,) = _reference_grads(lambda t: reference.adaptive_avg_pool2d(t, (oh, ow)), (x,), grad_y)
    assert_close(y, y_ref, dtype, "y")
    assert_close(grad_x, gx_ref, dtype, "grad_x")


@pytest.mark.parametrize("device", DEVICES)
def test_adaptive_max_pool2d_ties_and_nan_like_torch(device):
    """Ties go to the first maximum in row-major window order; NaN wins, and the last NaN of a window wins."""
    x = torch.zeros(1, 2, 7, 9, device=device)
    x[0, 1, 1, 2] = float("nan")
    x[0, 1, 2, 0] = float("nan")
    x[0, 1, 5, 5] = float("-inf")
    y, indices = _cuda.adaptive_max_pool2d_forward(x, (3, 4))
    y_ref, indices_ref = torch.nn.functional.adaptive_max_pool2d(x.cpu(), (3, 4), return_indices=True)
    assert torch.equal(indices.cpu(), indices_ref)
    assert torch.equal(y.cpu().isnan(), y_ref.isnan()) and y_ref.isnan().any()
    assert torch.equal(y.cpu().nan_to_num(), y_ref.nan_to_num())
    all_inf = torch.full((1, 1, 4, 4), float("-inf"), device=device)
    _, indices = _cuda.adaptive_max_pool2d_forward(all_inf, (2, 2))
    assert indices.flatten().tolist() == [0, 2, 8, 10]


@pytest.mark.parametrize("device", DEVICES)
def test_pool_backward_expanded_grad_and_empty_batch(device):
    x = torch.randn(2, 3, 25, 42, device=device)
    y, indices = _cuda.adaptive_max_pool2d_forward(x, (10, 10))
    grad_y = torch.ones((), device=device).expand_as(y)
    _, (gx_ref,) = _reference_grads(lambda t: reference.adaptive_max_pool2d(t, (10, 10)), (x,), grad_y)
    assert_close(_cuda.adaptive_max_pool2d_backward(grad_y, indices, (25, 42)), gx_ref, torch.float32, "max grad_x")
    _, (gx_ref,) = _reference_grads(lambda t: reference.adaptive_avg_pool2d(t, (10, 10)), (x,), grad_y)
    assert_close(_cuda.adaptive_avg_pool2d_backward(grad_y, (25, 42)), gx_ref, torch.float32, "avg grad_x")

    empty = torch.randn(0, 3, 5, 5, device=device)
    y, indices = _cuda.adaptive_max_pool2d_forward(empty, (2, 2))
    assert y.shape == (0, 3, 2, 2) and indices.shape == (0, 3, 2, 2)
    assert _cuda.adaptive_max_pool2d_backward(y, indices, (5, 5)).shape == empty.shape
    assert _cuda.adaptive_avg_pool2d_forward(empty, (2, 2)).shape == (0, 3, 2, 2)
    assert _cuda.adaptive_avg_pool2d_backward(y, (5, 5)).shape == empty.shape


# --------------------------------------------------------------------------------------------------------
# scale_residual_max_pool (the CIM back end): z and ffn are B x H x W x C. They are made as B x C x H x W maps in
# the case's layout and viewed as B x H x W x C, so "channels_last" gives dense z/ffn (the CIM's own layout),
# "contiguous" a view of NCHW memory and "strided" a view of neither.


def _scale_residual_inputs(case, dtype, layout, device):
    b, c, h, w, oh, ow = case
    z = make_input((b, c, h, w), dtype, layout, device).permute(0, 2, 3, 1)
    ffn = make_input((b, c, h, w), dtype, layout, device).permute(0, 2, 3, 1)
    gamma = torch.randn(c, device=device)
    grad_y = make_input((b, c, oh, ow), dtype, layout, device)
    return z, ffn, gamma, grad_y


def _scale_residual_reference(case):
    oh, ow = case[-2:]
    return lambda z, ffn, gamma: reference.scale_residual_max_pool(z, ffn, gamma, (oh, ow))


def _picked(ffn: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """ffn (B x H x W x C) at each argmax of ``indices`` (B x C x OH x OW), on the CPU."""
    picked = ffn.detach().cpu().permute(0, 3, 1, 2).flatten(2).gather(2, indices.cpu().flatten(2))
    return picked.view(indices.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, dtype, layout", _cases(ADAPTIVE_POOL_CASES, POOL_LOW_PRECISION))
def test_scale_residual_max_pool_matches_reference(case, dtype, layout, device):
    b, c, h, w, oh, ow = case
    z, ffn, gamma, grad_y = _scale_residual_inputs(case, dtype, layout, device)
    y, indices, picked_ffn = _cuda.scale_residual_max_pool_forward(z, ffn, gamma, (oh, ow))
    grad_z, grad_ffn, grad_gamma = _cuda.scale_residual_max_pool_backward(grad_y, gamma, indices, picked_ffn, (h, w))

    y_ref, grads_ref = _reference_grads(_scale_residual_reference(case), (z, ffn, gamma), grad_y)
    _, indices_ref = reference.adaptive_max_pool2d(
        (z.detach().double() + gamma.double() * ffn.detach().double()).permute(0, 3, 1, 2).cpu(),
        (oh, ow),
        return_indices=True,
    )
    for t, what in ((y, "y"), (indices, "indices"), (picked_ffn, "picked_ffn")):
        assert t.shape == (b, c, oh, ow) and t.is_contiguous(memory_format=torch.channels_last), what
    assert y.dtype == dtype and picked_ffn.dtype == dtype and indices.dtype == torch.int64
    assert torch.equal(indices.cpu(), indices_ref)
    assert torch.equal(picked_ffn.cpu(), _picked(ffn, indices_ref))
    assert_close(y, y_ref, dtype, "y")
    for grad, grad_ref, name in zip((grad_z, grad_ffn, grad_gamma), grads_ref, ("grad_z", "grad_ffn", "grad_gamma")):
        assert grad.is_contiguous(), name
        assert_close(grad, grad_ref, dtype, name)
    assert grad_z.dtype == grad_ffn.dtype == dtype and grad_gamma.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_scale_residual_max_pool_ties_nan_and_infinity_like_torch(device):
    """Integer values make the fp32 sums exact and most windows tie (the first maximum wins); a NaN sum wins,
    the last NaN of a window first; a window of -inf sums reports its first element, and its gradient (grad_y
    times ffn there, for gamma) goes there, as torch's."""
    z = torch.randint(-2, 3, (2, 13, 11, 3)).float()
    ffn = torch.randint(-2, 3, (2, 13, 11, 3)).float()
    gamma = torch.tensor([2.0, -1.0, 0.5])
    z[0, 2, 3, 1] = z[0, 1, 0, 1] = float("nan")
    ffn[1, 12, 10, 2] = float("nan")
    z[1, :4, :3, 0] = float("-inf")  # all of window (0, 0) of image 1, channel 0 (rows [0, 4), columns [0, 3))
    grad_y = torch.randint(-3, 4, (2, 3, 4, 5)).float()
    z, ffn, gamma, grad_y = (t.to(device) for t in (z, ffn, gamma, grad_y))

    y, indices, picked_ffn = _cuda.scale_residual_max_pool_forward(z, ffn, gamma, (4, 5))
    y_ref, indices_ref = torch.nn.functional.adaptive_max_pool2d(
        (z + gamma * ffn).permute(0, 3, 1, 2).cpu(), (4, 5), return_indices=True
    )
    assert y_ref[1, 0, 0, 0] == float("-inf") and indices_ref[1, 0, 0, 0] == 0 and y_ref.isnan().any()
    assert torch.equal(indices.cpu(), indices_ref)
    assert torch.equal(y.cpu().isnan(), y_ref.isnan())
    assert torch.equal(y.cpu().nan_to_num(), y_ref.nan_to_num())
    expected_picked = _picked(ffn, indices_ref)
    assert torch.equal(picked_ffn.cpu().isnan(), expected_picked.isnan())
    assert torch.equal(picked_ffn.cpu().nan_to_num(), expected_picked.nan_to_num())

    grads = _cuda.scale_residual_max_pool_backward(grad_y, gamma, indices, picked_ffn, (13, 11))
    leaves = [t.cpu().requires_grad_() for t in (z, ffn, gamma)]
    reference.scale_residual_max_pool(*leaves, (4, 5)).backward(grad_y.cpu())
    # Exactly torch's, NaN where torch's is NaN (the NaN ffn picked in channel 2 makes its gamma gradient NaN).
    assert leaves[2].grad.isnan().any()
    for grad, leaf, name in zip(grads, leaves, ("grad_z", "grad_ffn", "grad_gamma")):
        torch.testing.assert_close(grad.cpu(), leaf.grad, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_residual_max_pool_expanded_grad_empty_batch_and_determinism(device):
    z, ffn, gamma, _ = _scale_residual_inputs((7, 5, 25, 42, 10, 10), torch.float32, "channels_last", device)
    y, indices, picked_ffn = _cuda.scale_residual_max_pool_forward(z, ffn, gamma, (10, 10))
    grad_y = torch.ones((), device=device).expand_as(y)  # the gradient of y.sum(): stride 0
    grads = _cuda.scale_residual_max_pool_backward(grad_y, gamma, indices, picked_ffn, (25, 42))
    _, grads_ref = _reference_grads(_scale_residual_reference((7, 5, 25, 42, 10, 10)), (z, ffn, gamma), grad_y)
    for grad, grad_ref, name in zip(grads, grads_ref, ("grad_z", "grad_ffn", "grad_gamma")):
        assert_close(grad, grad_ref, torch.float32, name)
    # 700 pooled positions per channel: 22 partial sums, added in a fixed order.
    grad_y = torch.randn_like(y)
    first = _cuda.scale_residual_max_pool_backward(grad_y, gamma, indices, picked_ffn, (25, 42))
    second = _cuda.scale_residual_max_pool_backward(grad_y, gamma, indices, picked_ffn, (25, 42))
    for a, b in zip(first, second):
        assert torch.equal(a, b)

    empty = torch.randn(0, 5, 6, 3, device=device)
    y, indices, picked_ffn = _cuda.scale_residual_max_pool_forward(empty, empty, gamma[:3], (2, 2))
    assert y.shape == indices.shape == picked_ffn.shape == (0, 3, 2, 2)
    grad_z, grad_ffn, grad_gamma = _cuda.scale_residual_max_pool_backward(y, gamma[:3], indices, picked_ffn, (5, 6))
    assert grad_z.shape == grad_ffn.shape == empty.shape
    assert torch.equal(grad_gamma, torch.zeros(3, device=device))


BAD_SCALE_RESIDUAL_INPUTS = [
    ("3-D z", lambda z, f, g: (z[0], f[0], g), r"z must be 4-D \(B x H x W x C\)"),
    ("float64 z", lambda z, f, g: (z.double(), f.double(), g), "z must be float32, float16 or bfloat16"),
    ("ffn dtype", lambda z, f, g: (z, f.half(), g), "ffn must have the dtype of z"),
    ("ffn shape", lambda z, f, g: (z, f[:, 1:], g), r"ffn must have shape \[2, 6, 5, 4\]"),
    ("empty map", lambda z, f, g: (z[:, :0], f[:, :0], g), "z's H and W must be positive"),
    ("gamma shape", lambda z, f, g: (z, f, g[:3]), r"gamma must have shape \(4,\) to match z's channels"),
    ("fp16 gamma", lambda z, f, g: (z, f, g.half()), "gamma must be float32"),
]


@pytest.mark.parametrize(
    "name, corrupt, message", BAD_SCALE_RESIDUAL_INPUTS, ids=[c[0] for c in BAD_SCALE_RESIDUAL_INPUTS]
)
def test_scale_residual_max_pool_rejects_bad_input(name, corrupt, message):
    z, ffn, gamma = torch.randn(2, 6, 5, 4), torch.randn(2, 6, 5, 4), torch.randn(4)
    with pytest.raises(RuntimeError, match=message):
        _cuda.scale_residual_max_pool_forward(*corrupt(z, ffn, gamma), (2, 2))


def test_scale_residual_max_pool_backward_rejects_bad_input():
    grad_y, gamma = torch.randn(2, 4, 2, 2), torch.randn(4)
    indices, picked_ffn = torch.zeros(2, 4, 2, 2, dtype=torch.long), torch.randn(2, 4, 2, 2)
    backward = _cuda.scale_residual_max_pool_backward
    with pytest.raises(RuntimeError, match="output_size must be positive"):
        _cuda.scale_residual_max_pool_forward(torch.randn(2, 6, 5, 4), torch.randn(2, 6, 5, 4), gamma, (2, 0))
    with pytest.raises(RuntimeError, match=r"picked_ffn must have shape \[2, 4, 2, 2\]"):
        backward(grad_y, gamma, indices, picked_ffn[:, :, :1], (6, 5))
    with pytest.raises(RuntimeError, match="picked_ffn must have the dtype of grad_y"):
        backward(grad_y, gamma, indices, picked_ffn.half(), (6, 5))
    with pytest.raises(RuntimeError, match="indices must be an int64 tensor"):
        backward(grad_y, gamma, indices.int(), picked_ffn, (6, 5))
    with pytest.raises(RuntimeError, match=r"gamma must have shape \(4,\) to match grad_y's channels"):
        backward(grad_y, gamma[:2], indices, picked_ffn, (6, 5))
    with pytest.raises(RuntimeError, match="input_size must be"):
        backward(grad_y, gamma, indices, picked_ffn, (0, 5))


# --------------------------------------------------------------------------------------------------------
# Bad input: TORCH_CHECK messages name the argument and what was expected.

BAD_CONV_INPUTS = [
    ("float64", lambda x, w, b: (x.double(), w, b), "x must be float32, float16 or bfloat16"),
    ("3-D", lambda x, w, b: (x[0], w, b), r"x must be 4-D"),
    ("even kernel", lambda x, w, b: (x, torch.randn(4, 1, 4, 3), b), "kernel size must be odd"),
    ("kernel over 31", lambda x, w, b: (x, torch.randn(4, 1, 33, 3), b), "kernel size must be odd and at most 31"),
    ("channel mismatch", lambda x, w, b: (x, torch.randn(3, 1, 3, 3), b), "weight has 3 channels but x has 4"),
    ("weight shape", lambda x, w, b: (x, torch.randn(4, 2, 3, 3), b), r"weight must be C x 1 x kh x kw"),
    ("fp16 weight", lambda x, w, b: (x, w.half(), b), "weight must be float32"),
    ("bias shape", lambda x, w, b: (x, w, torch.randn(5)), r"bias must have shape \(4,\)"),
    ("fp16 bias", lambda x, w, b: (x, w, b.half()), "bias must be float32"),
]


@pytest.mark.parametrize("name, corrupt, message", BAD_CONV_INPUTS, ids=[c[0] for c in BAD_CONV_INPUTS])
def test_depthwise_conv2d_rejects_bad_input(name, corrupt, message):
    x, weight, bias = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(4)
    with pytest.raises(RuntimeError, match=message):
        _cuda.depthwise_conv2d_forward(*corrupt(x, weight, bias))


def test_backward_and_upsample_reject_bad_input():
    x, weight = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[2, 4, 5, 5\]"):
        _cuda.depthwise_conv2d_backward(torch.randn(2, 4, 5, 6), x, weight, [True] * 3)
    with pytest.raises(RuntimeError, match="grad_y must have the dtype of x"):
        _cuda.depthwise_conv2d_backward(x.half(), x, weight, [True] * 3)
    with pytest.raises(RuntimeError, match="query must have memory's batch and channels"):
        _cuda.upsample_add_conv_forward(torch.randn(2, 3, 2, 2), x, weight, None)
    with pytest.raises(RuntimeError, match="query must have the dtype of memory"):
        _cuda.upsample_add_conv_forward(torch.randn(2, 4, 2, 2).half(), x, weight, None)
    with pytest.raises(RuntimeError, match="weight has 4 channels but memory has 3"):
        _cuda.upsample_add_conv_forward(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 5, 5), weight, None)
    with pytest.raises(RuntimeError, match="output_size must be positive"):
        _cuda.adaptive_max_pool2d_forward(x, (0, 3))
    with pytest.raises(RuntimeError, match="indices must be an int64 tensor"):
        _cuda.adaptive_max_pool2d_backward(torch.randn(2, 4, 2, 2), torch.zeros(2, 4, 2, 2, dtype=torch.int32), (5, 5))
    with pytest.raises(RuntimeError, match=r"indices must have shape \[2, 4, 2, 2\]"):
        _cuda.adaptive_max_pool2d_backward(torch.randn(2, 4, 2, 2), torch.zeros(2, 4, 2, 3, dtype=torch.long), (5, 5))
    with pytest.raises(RuntimeError, match="input_size must be"):
        _cuda.adaptive_avg_pool2d_backward(torch.randn(2, 4, 2, 2), (0, 5))


@requires_cuda
def test_rejects_mixed_devices():
    x, weight = torch.randn(1, 4, 5, 5, device="cuda"), torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match="weight must be on the same device as x"):
        _cuda.depthwise_conv2d_forward(x, weight, None)
    z = torch.randn(1, 5, 5, 4, device="cuda")
    with pytest.raises(RuntimeError, match="gamma must be on the same device as z"):
        _cuda.scale_residual_max_pool_forward(z, z, torch.randn(4), (2, 2))
    with pytest.raises(RuntimeError, match="ffn must be on the same device as z"):
        _cuda.scale_residual_max_pool_forward(z, z.cpu(), torch.randn(4, device="cuda"), (2, 2))


# --------------------------------------------------------------------------------------------------------
# On a GPU: the CUDA kernels against the Triton backend, on DECO-sized inputs.


def _triton_primitives(module: str):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device (none present)")
    try:
        return importlib.import_module(f"deco_kernels.triton.{module}")
    except ImportError as error:
        pytest.skip(f"Triton backend unavailable: {error}")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_matches_triton(dtype, layout):
    dw = _triton_primitives("depthwise_conv2d")
    uac = _triton_primitives("upsample_add_conv")
    pool = _triton_primitives("adaptive_pool")
    fused = _triton_primitives("scale_residual_max_pool")
    memory = make_input((2, 48, 25, 42), dtype, layout, "cuda")
    query = make_input((2, 48, 10, 10), dtype, layout, "cuda")
    grad_y = make_input((2, 48, 25, 42), dtype, layout, "cuda")
    weight, bias = _parameters(48, 9, 9, "cuda")

    def compare(ours, theirs, what):
        # Each backend is within TOLERANCE of the exact result (the tests above), so they are within twice it.
        for index, (a, b) in enumerate(zip(ours, theirs)):
            scale = b.double().abs().max().clamp_min(1.0)
            error = (a.double() - b.double()).abs().max()
            assert error <= 2 * TOLERANCE[dtype] * scale, f"{what}[{index}]: cuda and triton differ by {error:.3g}"

    compare(
        [_cuda.depthwise_conv2d_forward(memory, weight, bias)],
        [dw.depthwise_conv2d_forward(memory, weight, bias)],
        "dw forward",
    )
    compare(
        _cuda.depthwise_conv2d_backward(grad_y, memory, weight, [True] * 3),
        dw.depthwise_conv2d_backward(grad_y, memory, weight, [True] * 3),
        "dw backward",
    )
    compare(
        [_cuda.upsample_add_conv_forward(query, memory, weight, bias)],
        [uac.upsample_add_conv_forward(query, memory, weight, bias)],
        "uac forward",
    )
    compare(
        _cuda.upsample_add_conv_backward(grad_y, query, memory, weight, [True] * 4),
        uac.upsample_add_conv_backward(grad_y, query, memory, weight, [True] * 4),
        "uac backward",
    )
    y, indices = _cuda.adaptive_max_pool2d_forward(memory, (10, 10))
    y_triton, indices_triton = pool.adaptive_max_pool2d_forward(memory, (10, 10))
    assert torch.equal(indices, indices_triton)
    compare([y], [y_triton], "max forward")
    compare(
        [_cuda.adaptive_max_pool2d_backward(query, indices, (25, 42))],
        [pool.adaptive_max_pool2d_backward(query, indices, (25, 42))],
        "max backward",
    )
    compare(
        [_cuda.adaptive_avg_pool2d_forward(memory, (10, 10))],
        [pool.adaptive_avg_pool2d_forward(memory, (10, 10))],
        "avg forward",
    )
    compare(
        [_cuda.adaptive_avg_pool2d_backward(query, (25, 42))],
        [pool.adaptive_avg_pool2d_backward(query, (25, 42))],
        "avg backward",
    )
    # The CIM back end on B x H x W x C views of the maps (dense for channels_last, NCHW memory otherwise).
    z, ffn = memory.permute(0, 2, 3, 1), grad_y.permute(0, 2, 3, 1)
    y, indices, picked_ffn = _cuda.scale_residual_max_pool_forward(z, ffn, bias, (10, 10))
    y_triton, indices_triton, picked_triton = fused.scale_residual_max_pool_forward(z, ffn, bias, (10, 10))
    assert torch.equal(indices, indices_triton)
    compare([y, picked_ffn], [y_triton, picked_triton], "scale residual max pool forward")
    compare(
        _cuda.scale_residual_max_pool_backward(query, bias, indices, picked_ffn, (25, 42)),
        fused.scale_residual_max_pool_backward(query, bias, indices, picked_ffn, (25, 42)),
        "scale residual max pool backward",
    )
    conv_ln = _triton_primitives("depthwise_conv2d_layernorm")
    norm_weight, norm_bias = 1 + 0.5 * torch.randn(48, device="cuda"), 0.5 * torch.randn(48, device="cuda")
    grad_out = make_input((2, 25, 42, 48), dtype, "contiguous", "cuda")
    ours = _cuda.depthwise_conv2d_layernorm_forward(memory, weight, bias, norm_weight, norm_bias, 1e-6)
    theirs = conv_ln.depthwise_conv2d_layernorm_forward(memory, weight, bias, norm_weight, norm_bias, 1e-6)
    compare(ours, theirs, "conv layernorm forward")
    compare(
        _cuda.depthwise_conv2d_layernorm_backward(grad_out, memory, weight, bias, norm_weight, *ours[1:], [True] * 5),
        conv_ln.depthwise_conv2d_layernorm_backward(grad_out, memory, weight, bias, norm_weight, *ours[1:], [True] * 5),
        "conv layernorm backward",
    )
