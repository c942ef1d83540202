"""deco_kernels.depthwise_conv2d against a float64 reference: forward and every gradient, every layout.

Without a GPU the "triton" backend runs in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with one, the same tests run on CUDA tensors for "triton" and, when the extension is
built, "cuda". Every output and gradient buffer the kernels allocate is filled with NaN first
(``poisoned_outputs``), so an element a kernel does not write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEPTHWISE_CASES, DTYPES, KERNEL_DEVICE, LAYOUTS, TARGETS, assert_close, make_input

import deco_kernels
from deco_kernels import reference
from deco_kernels.ops._common import memory_format_of, poisoned_outputs
from deco_kernels.triton import depthwise_conv2d as triton_depthwise

def expected_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format an op's output takes after an input in ``t``'s layout (strided -> suggested)."""
    return memory_format_of(t) or torch._prims_common.suggest_memory_format(t)


def check_op_against_reference(op, reference_op, activations, parameters, dtype, *, grad_layout="contiguous",
                               output_like=-1, output_format=None):
    """Run ``op(*activations, *parameters)`` and its backward with outputs poisoned; compare with float64.

    activations: tensors in the dtype and layout under test; parameters: float32 tensors or None. The
    reference runs on float64 copies of the same (already rounded) values with the same output gradient.
    The output must be contiguous in ``output_format``, by default the memory format of
    ``activations[output_like]``.
    """
    inputs = [t.detach().requires_grad_() for t in activations]
    params = [None if p is None else p.detach().requires_grad_() for p in parameters]
    with poisoned_outputs():
        out = op(*inputs, *params)
    inputs64 = [t.detach().to(torch.float64).requires_grad_() for t in activations]
    params64 = [None if p is None else p.detach().to(torch.float64).requires_grad_() for p in parameters]
    expected = reference_op(*inputs64, *params64)
    grad_out = make_input(tuple(expected.shape), dtype, grad_layout, device=out.device)
    expected.backward(grad_out.to(torch.float64))
    with poisoned_outputs():
        out.backward(grad_out)

    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=output_format or expected_format(activations[output_like]))
    assert_close(out, expected, dtype, "output")
    for index, (tensor, tensor64) in enumerate(zip(inputs + params, inputs64 + params64)):
        if tensor is None:
            continue
        assert tensor.grad is not None, f"no gradient for argument {index}"
        assert tensor.grad.dtype == tensor.dtype
        assert_close(tensor.grad, tensor64.grad, dtype, f"gradient of argument {index}")


def make_parameters(channels, kh, kw, device, bias=True):
    weight = torch.randn(channels, 1, kh, kw, device=device)
    return weight, (torch.randn(channels, device=device) if bias else None)


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference_fp32(case, layout, device, backend):
    batch, channels, height, width, kh, kw = case
    x = make_input((batch, channels, height, width), torch.float32, layout, device=device)
    weight, bias = make_parameters(channels, kh, kw, device)
    # An output gradient in the other format exercises mixed layouts inside one kernel launch.
    grad_layout = "contiguous" if layout == "channels_last" else "channels_last"
    check_op_against_reference(
        lambda x, w, b: deco_kernels.depthwise_conv2d(x, w, b, backend=backend),
        reference.depthwise_conv2d, [x], [weight, bias], torch.float32, grad_layout=grad_layout,
    )


LOW_PRECISION_CASES = [DEPTHWISE_CASES[i] for i in (1, 3, 9)]


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference_low_precision(case, dtype, layout, device, backend):
    batch, channels, height, width, kh, kw = case
    x = make_input((batch, channels, height, width), dtype, layout, device=device)
    weight, bias = make_parameters(channels, kh, kw, device)
    check_op_against_reference(
        lambda x, w, b: deco_kernels.depthwise_conv2d(x, w, b, backend=backend),
        reference.depthwise_conv2d, [x], [weight, bias], dtype, grad_layout=layout,
    )


def check_parameter_gradient_dtypes(op, reference_op, activations, parameters):
    """fp32 activations and parameters in other dtypes: math in fp32 on the parameters' values, each gradient
    back in its argument's dtype, checked at that dtype's tolerance (float64's at float32's)."""
    leaves = [t.detach().clone().requires_grad_() for t in (*activations, *parameters)]
    out = op(*leaves)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = reference_op(*leaves64)
    expected.backward(grad_out.double())
    assert out.dtype == torch.float32
    assert_close(out, expected, torch.float32, "output")
    for index, (leaf, leaf64) in enumerate(zip(leaves, leaves64)):
        assert leaf.grad.dtype == leaf.dtype, f"argument {index}"
        tolerance_dtype = torch.float32 if leaf.dtype == torch.float64 else leaf.dtype
        assert_close(leaf.grad, leaf64.grad, tolerance_dtype, f"gradient of argument {index}")


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.bfloat16), (torch.float64, torch.float16)], ids=str)
def test_parameters_in_other_dtypes_get_gradients_in_their_dtype(dtypes, device, backend):
    x = make_input((2, 5, 9, 7), torch.float32, "channels_last", device=device)
    weight, bias = (t.to(dtype) for t, dtype in zip(make_parameters(5, 3, 5, device), dtypes))
    check_parameter_gradient_dtypes(
        lambda *args: deco_kernels.depthwise_conv2d(*args, backend=backend), reference.depthwise_conv2d,
        [x], [weight, bias],
    )


@pytest.mark.parametrize("tile", triton_depthwise.TILES, ids=lambda t: t.name)
def test_every_gpu_tile(tile, monkeypatch):
    """Each GPU tile config, forced (on the GPU, or under the interpreter), over a map a bit larger than two
    tiles each way."""
    monkeypatch.setattr(triton_depthwise, "tile_config", lambda t: tile)
    channels = tile.block_c + 3 if tile.block_c > 1 else 2
    layout = "channels_last" if tile.block_c > 1 else "contiguous"
    x = make_input((2, channels, tile.block_h + 3, tile.block_w + 5), torch.float32, layout, device=KERNEL_DEVICE)
    weight, bias = make_parameters(channels, 3, 5, KERNEL_DEVICE)
    check_op_against_reference(
        lambda x, w, b: deco_kernels.depthwise_conv2d(x, w, b, backend="triton"),
        reference.depthwise_conv2d, [x], [weight, bias], torch.float32, grad_layout=layout,
    )


@pytest.mark.parametrize("device, backend", TARGETS)
def test_expanded_output_gradient(device, backend):
    """The gradient of .sum() is a stride-0 expanded tensor; backward must not read it as dense memory."""
    x = make_input((2, 5, 7, 6), torch.float32, "channels_last", device=device).requires_grad_()
    weight, bias = make_parameters(5, 3, 5, device)
    weight.requires_grad_()
    bias.requires_grad_()
    deco_kernels.depthwise_conv2d(x, weight, bias, backend=backend).sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    reference.depthwise_conv2d(x64, w64, b64).sum().backward()
    for actual, expected, name in ((x.grad, x64.grad, "x"), (weight.grad, w64.grad, "weight"),
                                   (bias.grad, b64.grad, "bias")):
        assert_close(actual, expected, torch.float32, f"gradient of {name}")


@pytest.mark.parametrize("device, backend", TARGETS)
def test_partial_gradients_and_no_bias(device, backend):
    """Only the gradients autograd asks for are computed; a missing bias is fine."""
    x = make_input((2, 3, 5, 4), torch.float32, "contiguous", device=device)
    weight, _ = make_parameters(3, 3, 3, device, bias=False)
    check_op_against_reference(
        lambda x, w: deco_kernels.depthwise_conv2d(x, w, None, backend=backend),
        lambda x, w: reference.depthwise_conv2d(x, w, None), [x], [weight], torch.float32,
    )
    weight.requires_grad_()
    deco_kernels.depthwise_conv2d(x, weight, backend=backend).square().sum().backward()
    assert x.grad is None
    w64 = weight.detach().double().requires_grad_()
    reference.depthwise_conv2d(x.double(), w64).square().sum().backward()
    assert_close(weight.grad, w64.grad, torch.float32, "gradient of weight")


@pytest.mark.parametrize("device, backend", TARGETS)
def test_weight_gradient_is_deterministic(device, backend):
    x = make_input((3, 24, 12, 20), torch.float32, "channels_last", device=device).requires_grad_()
    weight, bias = make_parameters(24, 5, 5, device)
    grad_out = torch.randn(3, 24, 12, 20, device=device)
    grads = []
    for _ in range(2):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        deco_kernels.depthwise_conv2d(x, w, b, backend=backend).backward(grad_out)
        grads.append((w.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("device, backend", TARGETS)
def test_empty_batch(device, backend):
    x = torch.randn(0, 4, 6, 5, device=device, requires_grad=True)
    weight, bias = make_parameters(4, 3, 3, device)
    weight.requires_grad_()
    bias.requires_grad_()
    with poisoned_outputs():
        y = deco_kernels.depthwise_conv2d(x, weight, bias, backend=backend)
        assert y.shape == (0, 4, 6, 5)
        y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_primitive_writes_every_element_of_its_outputs():
    """The launcher contract directly: outputs poisoned with NaN come back finite, in x's format."""
    x = make_input((2, 17, 9, 10), torch.bfloat16, "channels_last", device=KERNEL_DEVICE)
    weight, bias = make_parameters(17, 7, 3, KERNEL_DEVICE)
    with poisoned_outputs():
        y = triton_depthwise.depthwise_conv2d_forward(x, weight, bias)
        grad_x, grad_weight, grad_bias = triton_depthwise.depthwise_conv2d_backward(
            torch.randn_like(y), x, weight, [True, True, True])
    for t in (y, grad_x, grad_weight, grad_bias):
        assert torch.isfinite(t).all()
    assert y.dtype == grad_x.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last) and grad_x.is_contiguous(
        memory_format=torch.channels_last)
    assert grad_weight.dtype == grad_bias.dtype == torch.float32
    _, only_weight, no_bias = triton_depthwise.depthwise_conv2d_backward(
        torch.randn_like(y), x, weight, [False, True, False])
    assert only_weight.shape == weight.shape and no_bias is None


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda: (torch.randn(3, 5, 5), torch.randn(3, 1, 3, 3), None), ValueError, r"x must be 4-D"),
        (lambda: (torch.randn(1, 3, 5, 5).double(), torch.randn(3, 1, 3, 3), None), TypeError,
         r"float32, float16 or bfloat16"),
        (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 1, 3, 3), None), ValueError,
         r"weight has 4 channels but the input has 3"),
        (lambda: (torch.randn(1, 3, 5, 5), torch.randn(3, 2, 3, 3), None), ValueError, r"C x 1 x kh x kw"),
        (lambda: (torch.randn(1, 3, 5, 5), torch.randn(3, 1, 4, 3), None), ValueError,
         r"kernel size must be odd"),
        (lambda: (torch.randn(1, 3, 5, 5), torch.randn(3, 1, 3, 33), None), ValueError, r"1\.\.31"),
        (lambda: (torch.randn(1, 3, 5, 5), torch.randn(3, 1, 3, 3), torch.randn(4)), ValueError,
         r"bias must have shape \(3,\)"),
        (lambda: (torch.randn(1, 3, 5, 5), torch.randn(3, 1, 3, 3, device="meta"), None), ValueError,
         r"weight must be on the same device"),
        (lambda: (torch.randn(1, 3, 0, 5), torch.randn(3, 1, 3, 3), None), ValueError, r"H >= 1 and W >= 1"),
    ],
    ids=["3d", "float64", "channels", "not-depthwise", "even", "too-large", "bias-shape", "device", "empty-map"],
)
def test_bad_inputs_are_named(make_args, error, match):
    x, weight, bias = make_args()
    with pytest.raises(error, match=match):
        deco_kernels.depthwise_conv2d(x, weight, bias, backend="triton")


def test_backend_keyword_and_setting():
    """backend= wins over the process setting; "torch" is the reference itself."""
    x = torch.randn(1, 2, 4, 4, device=KERNEL_DEVICE)
    weight = torch.randn(2, 1, 3, 3, device=KERNEL_DEVICE)
    with deco_kernels.use_backend("triton"):
        assert deco_kernels.resolve_backend(x.device, op="depthwise_conv2d") == "triton"
        y = deco_kernels.depthwise_conv2d(x, weight, backend="torch")
    assert torch.equal(y, reference.depthwise_conv2d(x, weight))
    with pytest.raises(ValueError, match="backend must be one of"):
        deco_kernels.depthwise_conv2d(x, weight, backend="cudnn")
