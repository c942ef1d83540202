"""Adaptive max / average pooling: the "triton" and "cuda" backends against PyTorch.

Max pooling does no arithmetic, so its values and argmax indices must equal torch's exactly (ties, NaN and -inf
included); gradients and the average pool are compared with a float64 evaluation of the reference. Without a
GPU, Triton runs in its interpreter on CPU tensors and the CUDA backend runs its CPU build when one was
compiled; the GPU variants are skipped (visibly) here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (
    ADAPTIVE_POOL_CASES,
    LAYOUTS,
    assert_close,
    case_id,
    forbid_kernel_launches,
    make_input,
)

from deco_kernels import reference
from deco_kernels.ops._common import memory_format_of, poisoned_outputs
from deco_kernels.ops.adaptive_pool import adaptive_avg_pool2d, adaptive_max_pool2d
from deco_kernels.triton import adaptive_pool as triton_pool

MAX_OP = torch.ops.deco_kernels.adaptive_max_pool2d
AVG_OP = torch.ops.deco_kernels.adaptive_avg_pool2d
MAX_BACKWARD_OP = torch.ops.deco_kernels.adaptive_max_pool2d_backward
AVG_BACKWARD_OP = torch.ops.deco_kernels.adaptive_avg_pool2d_backward


@pytest.fixture(autouse=True)
def _poison():
    # Every output buffer starts as NaN (indices as -1), so an element a kernel skips cannot pass.
    with poisoned_outputs():
        yield


def _reference_grad(pool, x, output_size, grad_y):
    """Gradient of ``pool`` at ``x`` for ``grad_y``, in float64."""
    x64 = x.detach().to(torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(pool(x64, output_size), x64, grad_y.to(torch.float64))
    return grad


def _check_grad_layout(grad_x, x):
    """The gradient comes back in x's memory format (NCHW for a strided x, which the op densifies so)."""
    assert memory_format_of(grad_x) == (memory_format_of(x) or torch.contiguous_format)


def _check_max(x, output_size, backend, dtype, grad_y=None):
    """Forward values and indices exactly as torch's, layout as torch's, gradient vs float64."""
    x = x.detach().requires_grad_()
    y, indices = MAX_OP(x, list(output_size), backend)
    expected_y, expected_indices = F.adaptive_max_pool2d(x.detach().cpu(), output_size, return_indices=True)
    assert torch.equal(indices.cpu(), expected_indices), "argmax indices differ from torch's"
    assert torch.equal(y.detach().cpu(), expected_y), "max values differ from torch's"
    assert memory_format_of(y) == memory_format_of(expected_y)
    assert memory_format_of(indices) == memory_format_of(y)
    if grad_y is None:
        grad_y = torch.randn(y.shape, device=x.device).to(dtype)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    _check_grad_layout(grad_x, x)
    assert_close(grad_x, _reference_grad(reference.adaptive_max_pool2d, x, output_size, grad_y), dtype, "grad x")
    return grad_x


def _check_avg(x, output_size, backend, dtype):
    x = x.detach().requires_grad_()
    y = adaptive_avg_pool2d(x, output_size, backend=backend)
    assert y.dtype == x.dtype
    expected_y = reference.adaptive_avg_pool2d(x.detach().to(torch.float64), output_size)
    assert_close(y, expected_y, dtype, "avg y")
    assert memory_format_of(y) == memory_format_of(expected_y)
    grad_y = torch.randn(y.shape, device=x.device).to(dtype)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    _check_grad_layout(grad_x, x)
    assert_close(grad_x, _reference_grad(reference.adaptive_avg_pool2d, x, output_size, grad_y), dtype, "grad x")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ADAPTIVE_POOL_CASES, ids=case_id)
def test_fp32_every_case_and_layout(target, case, layout):
    device, backend = target
    b, c, h, w, out_h, out_w = case
    x = make_input((b, c, h, w), torch.float32, layout, device=device)
    _check_max(x, (out_h, out_w), backend, torch.float32)
    _check_avg(x, (out_h, out_w), backend, torch.float32)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", [ADAPTIVE_POOL_CASES[i] for i in (0, 1, 5)], ids=case_id)
def test_low_precision(target, case, dtype, layout):
    device, backend = target
    b, c, h, w, out_h, out_w = case
    x = make_input((b, c, h, w), dtype, layout, device=device)
    _check_max(x, (out_h, out_w), backend, dtype)
    _check_avg(x, (out_h, out_w), backend, dtype)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("case", ADAPTIVE_POOL_CASES, ids=case_id)
def test_max_ties_pick_the_first_maximum(target, case, layout):
    """Values from {-2..2} make most windows tie; integer gradients make the routed sums exact."""
    device, backend = target
    b, c, h, w, out_h, out_w = case
    x = torch.randint(-2, 3, (b, c, h, w)).to(device=device, dtype=torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randint(-4, 5, (b, c, out_h, out_w)).to(device=device, dtype=torch.float32)
    grad_x = _check_max(x, (out_h, out_w), backend, torch.float32, grad_y=grad_y)
    x_cpu = x.cpu().requires_grad_()
    F.adaptive_max_pool2d(x_cpu, (out_h, out_w)).backward(grad_y.cpu())
    assert torch.equal(grad_x.cpu(), x_cpu.grad)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_max_nan_and_infinity_like_torch(target, dtype):
    """A NaN is the maximum (the last NaN of a window wins, as in torch); an all -inf window reports its first
    element."""
    device, _ = target
    x = torch.randint(-2, 3, (2, 3, 13, 11)).to(dtype)
    x[0, 0, 2, 3] = x[0, 0, 4, 4] = x[1, 2, 0, 0] = x[1, 1, 12, 10] = float("nan")
    x[0, 1] = float("-inf")
    x[1, 0, :5, :5] = float("inf")
    x = x.to(device)
    y, indices = MAX_OP(x, [4, 5], target[1])
    expected_y, expected_indices = F.adaptive_max_pool2d(x.cpu(), (4, 5), return_indices=True)
    assert torch.equal(indices.cpu(), expected_indices)
    assert torch.equal(y.isnan().cpu(), expected_y.isnan())
    assert torch.equal(y.cpu().nan_to_num(), expected_y.nan_to_num())


@pytest.mark.parametrize("pool", ("max", "avg"))
def test_backward_with_expanded_grad_output(target, pool):
    """``y.sum()`` hands backward a stride-0 gradient; the primitives also read it through its strides."""
    device, backend = target
    function = adaptive_max_pool2d if pool == "max" else adaptive_avg_pool2d
    reference_function = reference.adaptive_max_pool2d if pool == "max" else reference.adaptive_avg_pool2d
    for layout in ("contiguous", "channels_last"):
        x = make_input((1, 3, 25, 42), torch.float32, layout, device=device).requires_grad_()
        function(x, (10, 10), backend=backend).sum().backward()
        ones = torch.ones(1, 3, 10, 10, device=device)
        assert_close(x.grad, _reference_grad(reference_function, x, (10, 10), ones), torch.float32, layout)

    if backend != "triton":
        return
    x = make_input((1, 3, 25, 42), torch.float32, "contiguous", device=device)
    expanded = torch.tensor(1.5, device=device).expand(1, 3, 10, 10)
    if pool == "max":
        _, indices = triton_pool.adaptive_max_pool2d_forward(x, (10, 10))
        grad_x = triton_pool.adaptive_max_pool2d_backward(expanded, indices, (25, 42))
    else:
        grad_x = triton_pool.adaptive_avg_pool2d_backward(expanded, (25, 42))
    assert_close(grad_x, _reference_grad(reference_function, x, (10, 10), expanded), torch.float32, "expanded")


def test_empty_batch_launches_nothing(target, monkeypatch):
    device, backend = target
    if backend == "triton":
        forbid_kernel_launches(monkeypatch, triton_pool, (
            "_adaptive_max_pool2d_forward_kernel",
            "_adaptive_max_pool2d_backward_kernel",
            "_adaptive_avg_pool2d_forward_kernel",
            "_adaptive_avg_pool2d_backward_kernel",
        ))
    for function in (adaptive_max_pool2d, adaptive_avg_pool2d):
        x = torch.randn(0, 4, 9, 7, device=device, requires_grad=True)
        y = function(x, (3, 2), backend=backend)
        assert y.shape == (0, 4, 3, 2)
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_output_size_forms(target):
    """An int means both dims; a None entry keeps that input dim, as in torch."""
    device, backend = target
    x = make_input((2, 3, 7, 9), torch.float32, "contiguous", device=device)
    for output_size, shape in ((4, (4, 4)), ((None, 3), (7, 3)), ([5, None], (5, 9)), (torch.Size([2, 6]), (2, 6))):
        y = adaptive_max_pool2d(x, output_size, backend=backend)
        assert y.shape[-2:] == shape
        assert torch.equal(y.cpu(), F.adaptive_max_pool2d(x.cpu(), output_size))
        y = adaptive_avg_pool2d(x, output_size, backend=backend)
        assert_close(y, F.adaptive_avg_pool2d(x.double(), output_size), torch.float32, f"avg {output_size}")


@pytest.mark.parametrize("pool", ("max", "avg"))
def test_backward_is_deterministic(target, pool):
    device, backend = target
    function = adaptive_max_pool2d if pool == "max" else adaptive_avg_pool2d
    x = torch.randint(-1, 2, (1, 4, 25, 42)).to(device=device, dtype=torch.float32).requires_grad_()
    grad_y = torch.randn(1, 4, 10, 10, device=device)
    first, second = (torch.autograd.grad(function(x, 10, backend=backend), x, grad_y)[0] for _ in range(2))
    assert torch.equal(first, second)


def test_max_backward_routes_nothing_from_indices_outside_their_window(target):
    """The raw backward op on indices no forward made: an index out of the plane or outside its own window routes
    nothing (the backward writes at the picked element, so it must never write out of bounds)."""
    device, backend = target
    grad_y = torch.arange(1.0, 9.0).reshape(1, 2, 2, 2).to(device)
    # 4 x 4 input, 2 x 2 windows: window (1, 1) holds elements 10, 11, 14, 15.
    indices = torch.tensor([[[-1, 0], [16, 15]], [[1 << 40, 5], [8, 10]]]).reshape(1, 2, 2, 2).to(device)
    grad_x = MAX_BACKWARD_OP(grad_y, indices, [4, 4], backend).cpu()
    expected = torch.zeros(1, 2, 16)
    # Channel 0: only window (1, 1) picked an element of its own. Channel 1: window (0, 1) picked 5 (row 1,
    # column 1), outside it; (1, 0) and (1, 1) picked 8 and 10, inside.
    expected[0, 0, 15] = 4.0
    expected[0, 1, 8] = 7.0
    expected[0, 1, 10] = 8.0
    assert torch.equal(grad_x, expected.reshape(1, 2, 4, 4))


@pytest.mark.parametrize("pool", ("max", "avg"))
def test_double_backward(target, pool):
    """Both backwards are linear in grad_y; their adjoints (argmax gather, avg pool) match torch's."""
    device, backend = target
    function = adaptive_max_pool2d if pool == "max" else adaptive_avg_pool2d
    reference_function = reference.adaptive_max_pool2d if pool == "max" else reference.adaptive_avg_pool2d
    x = make_input((2, 3, 13, 11), torch.float32, "channels_last", device=device).requires_grad_()
    grad_y = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    direction = torch.randn(2, 3, 13, 11, device=device)
    (grad_x,) = torch.autograd.grad(function(x, (4, 5), backend=backend), x, grad_y, create_graph=True)
    (actual,) = torch.autograd.grad(grad_x, grad_y, direction)

    x64 = x.detach().double().requires_grad_()
    grad_y64 = grad_y.detach().double().requires_grad_()
    (grad_x64,) = torch.autograd.grad(reference_function(x64, (4, 5)), x64, grad_y64, create_graph=True)
    (expected,) = torch.autograd.grad(grad_x64, grad_y64, direction.double())
    assert_close(actual, expected, torch.float32, "grad of grad_y")


def test_bad_input_is_rejected_with_a_clear_error(target):
    device, backend = target
    x = torch.randn(2, 3, 8, 8, device=device)
    for function in (adaptive_max_pool2d, adaptive_avg_pool2d):
        with pytest.raises(ValueError, match="x must be 4-D"):
            function(x[0], 2, backend=backend)
        with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
            function(x.to(torch.int32), 2, backend=backend)
        with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
            function(x.double(), 2, backend=backend)
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            function([[1.0]], 2, backend=backend)
        with pytest.raises(ValueError, match="H >= 1 and W >= 1"):
            function(x[:, :, :0], 2, backend=backend)
        for output_size in (0, (2, -1), (2, 2, 2), "2", (2.0, 2), True):
            with pytest.raises(ValueError, match="output_size must be"):
                function(x, output_size, backend=backend)
        with pytest.raises(ValueError, match="backend must be one of"):
            function(x, 2, backend="cudnn")
    if backend == "triton":
        wide = torch.zeros(1, 1, 1, 40_000, device=device)
        with pytest.raises(ValueError, match="too large for 32-bit window indices"):
            adaptive_max_pool2d(wide, (1, 60_000), backend=backend)


def test_torch_backend_is_the_reference():
    x = make_input((2, 3, 25, 42), torch.float64, "channels_last")
    assert torch.equal(adaptive_max_pool2d(x, 10, backend="torch"), F.adaptive_max_pool2d(x, 10))
    assert torch.equal(adaptive_avg_pool2d(x, (None, 5), backend="torch"), F.adaptive_avg_pool2d(x, (None, 5)))
    with pytest.raises(ValueError, match="x must be a 4-D"):
        adaptive_max_pool2d(x.long(), 10, backend="torch")


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_opcheck(target, layout):
    device, backend = target
    x = make_input((2, 3, 7, 9), torch.float32, layout, device=device)
    grad_y = make_input((2, 3, 3, 4), torch.float32, layout, device=device)
    _, indices = MAX_OP(x, [3, 4], backend)
    ops_and_args = (
        (MAX_OP, (x, [3, 4], backend)),
        (MAX_OP, (x.clone().requires_grad_(), [3, 4], backend)),
        (AVG_OP, (x.clone().requires_grad_(), [3, 4], backend)),
        (MAX_BACKWARD_OP, (grad_y.clone().requires_grad_(), indices, [7, 9], backend)),
        (AVG_BACKWARD_OP, (grad_y.clone().requires_grad_(), [7, 9], backend)),
    )
    for op, args in ops_and_args:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(target):
    """The custom ops' fakes and autograd registrations trace without a graph break."""
    device, backend = target

    # Through the custom ops rather than the public functions: resolve_backend (deco_kernels.backend) probes
    # the optional extension with a guarded import that dynamo cannot trace yet.
    def loss(x):
        return MAX_OP(x, [3, 4], backend)[0].square().sum() + AVG_OP(x, [2, 2], backend).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 7, 9), torch.float32, "channels_last", device=device)
    x_compiled = x.clone().requires_grad_()
    x_eager = x.clone().requires_grad_()
    compiled(x_compiled).backward()
    eager_max, eager_avg = F.adaptive_max_pool2d(x_eager, (3, 4)), F.adaptive_avg_pool2d(x_eager, 2)
    (eager_max.square().sum() + eager_avg.square().sum()).backward()
    assert_close(x_compiled.grad, x_eager.grad.double(), torch.float32, "compiled grad")


def test_large_map_uses_the_large_block_config(target):
    """16 x 64 x 64 elements (2**16): the forward and avg backward launch with the large (BLOCK=512) config,
    and the max backward, one lane per pooled window, with its large one when there are 2**16 windows."""
    device, backend = target
    assert triton_pool._config(16 * 64 * 64) == triton_pool.CONFIGS[1]
    assert triton_pool._config(16 * 64 * 64, triton_pool.ROUTE_CONFIGS) == triton_pool.ROUTE_CONFIGS[1]
    x = make_input((1, 16, 64, 64), torch.float32, "channels_last", device=device)
    _check_max(x, (10, 10), backend, torch.float32)
    _check_max(x, (64, 64), backend, torch.float32)
    _check_avg(x, (10, 10), backend, torch.float32)
