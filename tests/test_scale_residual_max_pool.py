"""The fused CIM back end ``adaptive_max_pool2d(z + gamma * ffn)``: the "triton" and "cuda" backends against a
float64 evaluation of its PyTorch reference.

z and ffn are B x H x W x C; the shapes come from ADAPTIVE_POOL_CASES (B, C, H, W, OH, OW). Without a GPU,
Triton runs in its interpreter on CPU tensors and the "cuda" backend runs the CPU build of its kernels
(deco_kernels._C) when one was compiled; the GPU variants are skipped (visibly) here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (
    ADAPTIVE_POOL_CASES,
    assert_close,
    case_id,
    forbid_kernel_launches,
)

from deco_kernels import _cuda, reference
from deco_kernels.ops._common import poisoned_outputs
from deco_kernels.ops.scale_residual_max_pool import scale_residual_max_pool
from deco_kernels.triton import scale_residual_max_pool as triton_fused

FUSED_OP = torch.ops.deco_kernels.scale_residual_max_pool
BACKWARD_OP = torch.ops.deco_kernels.scale_residual_max_pool_backward


@pytest.fixture(autouse=True)
def _poison():
    # Every output buffer starts as NaN (integers as -1 or INT64_MAX), so an element a kernel skips cannot pass:
    # the Triton launchers allocate through empty_output (poisoned_outputs), the CUDA primitives with at::empty
    # (filled by deterministic mode).
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(4).isnan().all(), "at::empty is not poisoned: the unwritten-output checks would be blind"
        with poisoned_outputs():
            yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _inputs(case, dtype, device, integer=False):
    """z, ffn: B x H x W x C and gamma: C (float32), random normal or small integers (exact sums, many ties)."""
    b, c, h, w, _, _ = case
    if integer:
        z = torch.randint(-2, 3, (b, h, w, c)).float()
        ffn = torch.randint(-2, 3, (b, h, w, c)).float()
        gamma = torch.tensor([-1.0, 0.5, 2.0])[torch.randint(0, 3, (c,))]
    else:
        z, ffn, gamma = torch.randn(b, h, w, c), torch.randn(b, h, w, c), torch.randn(c)
    return z.to(device=device, dtype=dtype), ffn.to(device=device, dtype=dtype), gamma.to(device)


def _reference(z, ffn, gamma, output_size, grad_y):
    """Forward and the three gradients in float64, on the CPU."""
    z64, ffn64, gamma64 = (t.detach().to(torch.float64).cpu().requires_grad_() for t in (z, ffn, gamma))
    y = reference.scale_residual_max_pool(z64, ffn64, gamma64, output_size)
    grads = torch.autograd.grad(y, (z64, ffn64, gamma64), grad_y.to(torch.float64).cpu())
    return y.detach(), grads


def _run(z, ffn, gamma, output_size, grad_y, backend):
    z, ffn, gamma = (t.detach().clone().requires_grad_() for t in (z, ffn, gamma))
    y = scale_residual_max_pool(z, ffn, gamma, output_size, backend=backend)
    grads = torch.autograd.grad(y, (z, ffn, gamma), grad_y)
    return y, grads


def _check(case, dtype, target, integer=False):
    device, backend = target
    b, c, _, _, out_h, out_w = case
    z, ffn, gamma = _inputs(case, dtype, device, integer)
    grad_y = torch.randn(b, c, out_h, out_w, device=device).to(dtype)
    y, grads = _run(z, ffn, gamma, (out_h, out_w), grad_y, backend)
    expected_y, expected_grads = _reference(z, ffn, gamma, (out_h, out_w), grad_y)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected_y, dtype, "y")
    for grad, expected, name in zip(grads, expected_grads, ("grad z", "grad ffn", "grad gamma")):
        assert grad.dtype == (torch.float32 if name == "grad gamma" else dtype), name
        assert_close(grad, expected, dtype, name)


@pytest.mark.parametrize("case", ADAPTIVE_POOL_CASES, ids=case_id)
def test_fp32_every_case(target, case):
    _check(case, torch.float32, target)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", [ADAPTIVE_POOL_CASES[i] for i in (0, 1)], ids=case_id)
def test_low_precision(target, case, dtype):
    _check(case, dtype, target)


@pytest.mark.parametrize("case", ADAPTIVE_POOL_CASES, ids=case_id)
def test_ties_route_to_the_first_maximum_exactly(target, case):
    """Integer z/ffn and gamma in {-1, 0.5, 2} make the sums exact and most windows tie: the argmax, the pooled
    values and every (integer-valued) gradient must equal torch's exactly."""
    device, backend = target
    b, c, _, _, out_h, out_w = case
    z, ffn, gamma = _inputs(case, torch.float32, device, integer=True)
    y, indices, picked = FUSED_OP(z, ffn, gamma, [out_h, out_w], backend)
    total = (z + gamma * ffn).permute(0, 3, 1, 2).cpu()
    expected_y, expected_indices = F.adaptive_max_pool2d(total, (out_h, out_w), return_indices=True)
    assert torch.equal(indices.cpu(), expected_indices)
    assert torch.equal(y.cpu(), expected_y)
    picked_expected = ffn.permute(0, 3, 1, 2).cpu().flatten(2).gather(2, expected_indices.flatten(2))
    assert torch.equal(picked.cpu(), picked_expected.view_as(expected_y))

    grad_y = torch.randint(-3, 4, (b, c, out_h, out_w)).float().to(device)
    _, grads = _run(z, ffn, gamma, (out_h, out_w), grad_y, backend)
    z_cpu, ffn_cpu, gamma_cpu = (t.cpu().requires_grad_() for t in (z, ffn, gamma))
    reference.scale_residual_max_pool(z_cpu, ffn_cpu, gamma_cpu, (out_h, out_w)).backward(grad_y.cpu())
    for grad, expected in zip(grads, (z_cpu.grad, ffn_cpu.grad, gamma_cpu.grad)):
        assert torch.equal(grad.cpu(), expected)


def test_nan_and_infinity_like_torch(target):
    """A NaN sum is the maximum (the last NaN of a window wins); a window whose sums are all -inf reports its
    first element, as torch does."""
    device, backend = target
    z, ffn, gamma = _inputs((2, 3, 13, 11, 4, 5), torch.float32, "cpu", integer=True)
    z[0, 2, 3, 1] = z[1, 12, 10, 2] = float("nan")
    ffn[0, 4, 4, 1] = float("nan")
    z[1, :4, :3, 0] = float("-inf")  # all of window (0, 0) of image 1, channel 0
    z, ffn, gamma = z.to(device), ffn.to(device), gamma.to(device)
    y, indices, picked = FUSED_OP(z, ffn, gamma, [4, 5], backend)
    expected_y, expected_indices = F.adaptive_max_pool2d(
        (z + gamma * ffn).permute(0, 3, 1, 2).cpu(), (4, 5), return_indices=True
    )
    assert expected_y[1, 0, 0, 0] == float("-inf") and expected_y.isnan().any()
    assert torch.equal(indices.cpu(), expected_indices)
    assert torch.equal(y.isnan().cpu(), expected_y.isnan())
    assert torch.equal(y.cpu().nan_to_num(), expected_y.nan_to_num())
    picked_expected = ffn.permute(0, 3, 1, 2).cpu().flatten(2).gather(2, expected_indices.flatten(2))
    picked_expected = picked_expected.view_as(expected_y)
    # Every window, the all -inf one included, stores ffn at its argmax: that is what grad_gamma sums.
    assert torch.equal(picked.cpu().isnan(), picked_expected.isnan())
    assert torch.equal(picked.cpu().nan_to_num(), picked_expected.nan_to_num())


def test_non_contiguous_inputs_and_bf16_gamma(target):
    """z as a B x H x W x C view of an NCHW tensor, ffn a strided view; gamma's gradient comes back in its
    dtype."""
    device, backend = target
    case = (2, 6, 25, 42, 10, 10)
    z = torch.randn(2, 6, 25, 42, device=device).permute(0, 2, 3, 1)
    ffn = torch.randn(2, 25, 84, 6, device=device)[:, :, ::2]
    gamma = torch.randn(6, device=device).to(torch.bfloat16)
    grad_y = torch.randn(2, 6, 10, 10, device=device)
    y, (grad_z, grad_ffn, grad_gamma) = _run(z, ffn, gamma, case[-2:], grad_y, backend)
    assert grad_gamma.dtype == torch.bfloat16
    expected_y, expected_grads = _reference(z, ffn, gamma, case[-2:], grad_y)
    assert_close(y, expected_y, torch.float32, "y")
    assert_close(grad_z, expected_grads[0], torch.float32, "grad z")
    assert_close(grad_ffn, expected_grads[1], torch.float32, "grad ffn")
    assert_close(grad_gamma, expected_grads[2], torch.bfloat16, "grad gamma")


def test_expanded_grad_output_and_output_size_forms(target):
    device, backend = target
    z, ffn, gamma = _inputs((2, 5, 7, 9, 3, 4), torch.float32, device)
    for output_size, shape in ((4, (4, 4)), ((None, 3), (7, 3)), ([5, None], (5, 9))):
        leaves = [t.clone().requires_grad_() for t in (z, ffn, gamma)]
        y = scale_residual_max_pool(*leaves, output_size, backend=backend)
        assert y.shape == (2, 5, *shape)
        y.sum().backward()  # a stride-0 gradient
        _, expected_grads = _reference(z, ffn, gamma, output_size, torch.ones(y.shape))
        for leaf, expected, name in zip(leaves, expected_grads, ("grad z", "grad ffn", "grad gamma")):
            assert_close(leaf.grad, expected, torch.float32, f"{name} {output_size}")


def test_gamma_gradient_is_deterministic_over_many_splits(target):
    """B*OH*OW = 700 pooled positions per channel: several partial sums per channel (Triton: 3 rows of 256,
    CUDA: 22 splits of 32), reduced in a fixed order."""
    device, backend = target
    z, ffn, gamma = _inputs((7, 3, 10, 10, 10, 10), torch.float32, device)
    grad_y = torch.randn(7, 3, 10, 10, device=device)
    first, second = (_run(z, ffn, gamma, (10, 10), grad_y, backend)[1] for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _, expected_grads = _reference(z, ffn, gamma, (10, 10), grad_y)
    assert_close(first[2], expected_grads[2], torch.float32, "grad gamma")


def test_empty_batch(target, monkeypatch):
    """B = 0: empty results, a zero gamma gradient; the Triton launchers launch nothing."""
    device, backend = target
    if backend == "triton":
        forbid_kernel_launches(monkeypatch, triton_fused, (
            "_scale_residual_max_pool_forward_kernel",
            "_scale_residual_max_pool_backward_kernel",
            "_scale_residual_max_pool_grad_gamma_kernel",
        ))
    z, ffn, gamma = (t.requires_grad_() for t in _inputs((0, 4, 9, 7, 3, 2), torch.float32, device))
    y = scale_residual_max_pool(z, ffn, gamma, (3, 2), backend=backend)
    assert y.shape == (0, 4, 3, 2)
    y.sum().backward()
    assert z.grad.shape == z.shape and ffn.grad.shape == ffn.shape
    assert torch.equal(gamma.grad, torch.zeros_like(gamma))


def test_bad_input_is_rejected_with_a_clear_error(target):
    device, backend = target
    z, ffn, gamma = _inputs((2, 4, 6, 5, 2, 2), torch.float32, device)
    call = scale_residual_max_pool
    with pytest.raises(ValueError, match="z must be 4-D"):
        call(z[0], ffn[0], gamma, 2, backend=backend)
    with pytest.raises(ValueError, match="ffn must have z's shape"):
        call(z, ffn[:, :-1], gamma, 2, backend=backend)
    with pytest.raises(TypeError, match="ffn must have the same dtype as z"):
        call(z, ffn.half(), gamma, 2, backend=backend)
    with pytest.raises(TypeError, match="z must be float32, float16 or bfloat16"):
        call(z.double(), ffn.double(), gamma, 2, backend=backend)
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\)"):
        call(z, ffn, gamma[:3], 2, backend=backend)
    with pytest.raises(TypeError, match="gamma must be floating point"):
        call(z, ffn, gamma.long(), 2, backend=backend)
    with pytest.raises(ValueError, match="output_size must be"):
        call(z, ffn, gamma, (2, 0), backend=backend)
    with pytest.raises(ValueError, match=r"z must have H >= 1 and W >= 1 \(B x H x W x C\)"):
        call(z[:, :0], ffn[:, :0], gamma, 2, backend=backend)
    with pytest.raises(ValueError, match=r"z must have H >= 1 and W >= 1 \(B x H x W x C\)"):
        call(z[:, :, :0], ffn[:, :, :0], gamma, 2, backend=backend)
    with pytest.raises(ValueError, match=r"z must have C >= 1"):
        call(z[..., :0], ffn[..., :0], gamma[:0], 2, backend=backend)


def test_torch_backend_is_the_reference():
    z, ffn, gamma = _inputs((2, 4, 6, 5, 2, 3), torch.float32, "cpu")
    expected = F.adaptive_max_pool2d((z + gamma * ffn).permute(0, 3, 1, 2), (2, 3))
    assert torch.equal(scale_residual_max_pool(z, ffn, gamma, (2, 3), backend="torch"), expected)


def test_opcheck(target):
    device, backend = target
    z, ffn, gamma = (t.requires_grad_() for t in _inputs((2, 3, 7, 9, 3, 4), torch.float32, device))
    torch.library.opcheck(FUSED_OP, (z, ffn, gamma, [3, 4], backend))
    _, indices, picked = FUSED_OP(z, ffn, gamma, [3, 4], backend)
    grad_y = torch.randn(2, 3, 3, 4, device=device).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(BACKWARD_OP, (grad_y, gamma.detach(), indices, picked, [7, 9], backend))


def test_torch_compile_fullgraph(target):
    device, backend = target
    z, ffn, gamma = _inputs((2, 3, 7, 9, 3, 4), torch.float32, device)

    # Through the custom op: resolve_backend cannot be traced by dynamo yet (see test_adaptive_pool.py).
    def loss(z, ffn, gamma):
        return FUSED_OP(z, ffn, gamma, [3, 4], backend)[0].square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (z, ffn, gamma)]
    compiled(*leaves).backward()
    y, _ = _reference(z, ffn, gamma, (3, 4), torch.zeros(2, 3, 3, 4))
    _, expected_grads = _reference(z, ffn, gamma, (3, 4), 2 * y)
    for leaf, expected in zip(leaves, expected_grads):
        assert_close(leaf.grad, expected, torch.float32, "compiled grad")


@pytest.mark.skipif(not _cuda.is_available(), reason=f"deco_kernels._C is not built: {_cuda.load_error()}")
def test_cuda_backend_runs_the_cuda_primitives(monkeypatch):
    """backend="cuda" runs the extension's forward and backward (no substitute), and nothing of Triton's."""
    for name in ("scale_residual_max_pool_forward", "scale_residual_max_pool_backward"):
        monkeypatch.setattr(triton_fused, name, lambda *args: pytest.fail("the Triton primitives ran"))
    z, ffn, gamma = (t.requires_grad_() for t in _inputs((2, 3, 7, 9, 3, 4), torch.float32, "cpu"))
    with torch.profiler.profile() as profile:
        y = scale_residual_max_pool(z, ffn, gamma, (3, 4), backend="cuda")
        y.backward(torch.ones_like(y))
    primitives = [event.name for event in profile.events() if event.name.startswith("deco_kernels_C::")]
    assert [name for name in primitives if name.endswith(("_forward", "_backward"))] == [
        "deco_kernels_C::scale_residual_max_pool_forward",
        "deco_kernels_C::scale_residual_max_pool_backward",
    ]
    expected_y, expected_grads = _reference(z, ffn, gamma, (3, 4), torch.ones(2, 3, 3, 4))
    assert_close(y, expected_y, torch.float32, "y")
    for leaf, expected in zip((z, ffn, gamma), expected_grads):
        assert_close(leaf.grad, expected, torch.float32, "grad")
