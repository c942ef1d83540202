"""The fused CIM back end ``adaptive_max_pool2d(z + gamma * ffn)`` (Triton) against its PyTorch reference.

z and ffn are B x H x W x C; the shapes come from ADAPTIVE_POOL_CASES (B, C, H, W, OH, OW). Without a GPU the
kernels run in Triton's interpreter on CPU tensors; the GPU variants are skipped (visibly) here.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from kernel_cases import ADAPTIVE_POOL_CASES, assert_close, case_id

from deco_kernels.backend import available_backends
from deco_kernels.ops._common import poisoned_outputs
from deco_kernels.ops.scale_residual_max_pool import reference_scale_residual_max_pool, scale_residual_max_pool
from deco_kernels.triton import scale_residual_max_pool as triton_fused

FUSED_OP = torch.ops.deco_kernels.scale_residual_max_pool
BACKWARD_OP = torch.ops.deco_kernels.scale_residual_max_pool_backward


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=requires_cuda)])
def device(request):
    if "triton" not in available_backends(request.param):
        pytest.skip(f"Triton cannot run on {request.param} here ({available_backends(request.param)})")
    return request.param


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


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
    """Forward and the three gradients in float64."""
    z64, ffn64, gamma64 = (t.detach().to(torch.float64).requires_grad_() for t in (z, ffn, gamma))
    y = reference_scale_residual_max_pool(z64, ffn64, gamma64, output_size)
    grads = torch.autograd.grad(y, (z64, ffn64, gamma64), grad_y.to(torch.float64))
    return y.detach(), grads


def _run(z, ffn, gamma, output_size, grad_y):
    z, ffn, gamma = (t.detach().clone().requires_grad_() for t in (z, ffn, gamma))
    y = scale_residual_max_pool(z, ffn, gamma, output_size, backend="triton")
    grads = torch.autograd.grad(y, (z, ffn, gamma), grad_y)
    return y, grads


def _check(case, dtype, device, integer=False):
    b, c, h, w, out_h, out_w = case
    z, ffn, gamma = _inputs(case, dtype, device, integer)
    grad_y = torch.randn(b, c, out_h, out_w, device=device).to(dtype)
    y, grads = _run(z, ffn, gamma, (out_h, out_w), grad_y)
    expected_y, expected_grads = _reference(z, ffn, gamma, (out_h, out_w), grad_y)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected_y, dtype, "y")
    for grad, expected, name in zip(grads, expected_grads, ("grad z", "grad ffn", "grad gamma")):
        assert grad.dtype == (torch.float32 if name == "grad gamma" else dtype), name
        assert_close(grad, expected, dtype, name)


@pytest.mark.parametrize("case", ADAPTIVE_POOL_CASES, ids=case_id)
def test_fp32_every_case(device, case):
    _check(case, torch.float32, device)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", [ADAPTIVE_POOL_CASES[i] for i in (0, 1)], ids=case_id)
def test_low_precision(device, case, dtype):
    _check(case, dtype, device)


@pytest.mark.parametrize("case", ADAPTIVE_POOL_CASES, ids=case_id)
def test_ties_route_to_the_first_maximum_exactly(device, case):
    """Integer z/ffn and gamma in {-1, 0.5, 2} make the sums exact and most windows tie: the argmax, the pooled
    values and every (integer-valued) gradient must equal torch's exactly."""
    b, c, h, w, out_h, out_w = case
    z, ffn, gamma = _inputs(case, torch.float32, device, integer=True)
    y, indices, picked = FUSED_OP(z, ffn, gamma, [out_h, out_w], "triton")
    total = (z + gamma * ffn).permute(0, 3, 1, 2).cpu()
    expected_y, expected_indices = F.adaptive_max_pool2d(total, (out_h, out_w), return_indices=True)
    assert torch.equal(indices.cpu(), expected_indices)
    assert torch.equal(y.cpu(), expected_y)
    picked_expected = ffn.permute(0, 3, 1, 2).cpu().flatten(2).gather(2, expected_indices.flatten(2))
    assert torch.equal(picked.cpu(), picked_expected.view_as(expected_y))

    grad_y = torch.randint(-3, 4, (b, c, out_h, out_w)).float().to(device)
    _, grads = _run(z, ffn, gamma, (out_h, out_w), grad_y)
    z_cpu, ffn_cpu, gamma_cpu = (t.cpu().requires_grad_() for t in (z, ffn, gamma))
    reference_scale_residual_max_pool(z_cpu, ffn_cpu, gamma_cpu, (out_h, out_w)).backward(grad_y.cpu())
    for grad, expected in zip(grads, (z_cpu.grad, ffn_cpu.grad, gamma_cpu.grad)):
        assert torch.equal(grad.cpu(), expected)


def test_nan_is_the_maximum(device):
    z, ffn, gamma = _inputs((2, 3, 13, 11, 4, 5), torch.float32, device, integer=True)
    z[0, 2, 3, 1] = z[1, 12, 10, 2] = float("nan")
    ffn[0, 4, 4, 1] = float("nan")
    y, indices, _ = FUSED_OP(z, ffn, gamma, [4, 5], "triton")
    expected_y, expected_indices = F.adaptive_max_pool2d(
        (z + gamma * ffn).permute(0, 3, 1, 2).cpu(), (4, 5), return_indices=True
    )
    assert torch.equal(indices.cpu(), expected_indices)
    assert torch.equal(y.isnan().cpu(), expected_y.isnan())
    assert torch.equal(y.cpu().nan_to_num(), expected_y.nan_to_num())


def test_non_contiguous_inputs_and_bf16_gamma(device):
    """z as a B x H x W x C view of an NCHW tensor, ffn a strided view; gamma's gradient comes back in its
    dtype."""
    case = (2, 6, 25, 42, 10, 10)
    z = torch.randn(2, 6, 25, 42, device=device).permute(0, 2, 3, 1)
    ffn = torch.randn(2, 25, 84, 6, device=device)[:, :, ::2]
    gamma = torch.randn(6, device=device).to(torch.bfloat16)
    grad_y = torch.randn(2, 6, 10, 10, device=device)
    y, (grad_z, grad_ffn, grad_gamma) = _run(z, ffn, gamma, case[-2:], grad_y)
    assert grad_gamma.dtype == torch.bfloat16
    expected_y, expected_grads = _reference(z, ffn, gamma, case[-2:], grad_y)
    assert_close(y, expected_y, torch.float32, "y")
    assert_close(grad_z, expected_grads[0], torch.float32, "grad z")
    assert_close(grad_ffn, expected_grads[1], torch.float32, "grad ffn")
    assert_close(grad_gamma, expected_grads[2], torch.bfloat16, "grad gamma")


def test_expanded_grad_output_and_output_size_forms(device):
    z, ffn, gamma = _inputs((2, 5, 7, 9, 3, 4), torch.float32, device)
    for output_size, shape in ((4, (4, 4)), ((None, 3), (7, 3)), ([5, None], (5, 9))):
        leaves = [t.clone().requires_grad_() for t in (z, ffn, gamma)]
        y = scale_residual_max_pool(*leaves, output_size, backend="triton")
        assert y.shape == (2, 5, *shape)
        y.sum().backward()  # a stride-0 gradient
        _, expected_grads = _reference(z, ffn, gamma, output_size, torch.ones(y.shape, device=device))
        for leaf, expected, name in zip(leaves, expected_grads, ("grad z", "grad ffn", "grad gamma")):
            assert_close(leaf.grad, expected, torch.float32, f"{name} {output_size}")


def test_gamma_gradient_is_deterministic_over_many_splits(device):
    """B*OH*OW = 700 pooled positions per channel: three partial-sum rows, reduced in a fixed order."""
    z, ffn, gamma = _inputs((7, 3, 10, 10, 10, 10), torch.float32, device)
    grad_y = torch.randn(7, 3, 10, 10, device=device)
    first, second = (_run(z, ffn, gamma, (10, 10), grad_y)[1] for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _, expected_grads = _reference(z, ffn, gamma, (10, 10), grad_y)
    assert_close(first[2], expected_grads[2], torch.float32, "grad gamma")


def test_empty_batch_launches_nothing(device, monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for an empty tensor")

    for name in (
        "_scale_residual_max_pool_forward_kernel",
        "_scale_residual_max_pool_backward_kernel",
        "_scale_residual_max_pool_grad_gamma_kernel",
    ):
        monkeypatch.setattr(triton_fused, name, NoLaunch())
    z, ffn, gamma = (t.requires_grad_() for t in _inputs((0, 4, 9, 7, 3, 2), torch.float32, device))
    y = scale_residual_max_pool(z, ffn, gamma, (3, 2), backend="triton")
    assert y.shape == (0, 4, 3, 2)
    y.sum().backward()
    assert z.grad.shape == z.shape and ffn.grad.shape == ffn.shape
    assert torch.equal(gamma.grad, torch.zeros_like(gamma))


def test_bad_input_is_rejected_with_a_clear_error(device):
    z, ffn, gamma = _inputs((2, 4, 6, 5, 2, 2), torch.float32, device)
    call = scale_residual_max_pool
    with pytest.raises(ValueError, match="z must be 4-D"):
        call(z[0], ffn[0], gamma, 2, backend="triton")
    with pytest.raises(ValueError, match="ffn must have z's shape"):
        call(z, ffn[:, :-1], gamma, 2, backend="triton")
    with pytest.raises(TypeError, match="ffn must have the same dtype as z"):
        call(z, ffn.half(), gamma, 2, backend="triton")
    with pytest.raises(TypeError, match="z must be float32, float16 or bfloat16"):
        call(z.double(), ffn.double(), gamma, 2, backend="triton")
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\)"):
        call(z, ffn, gamma[:3], 2, backend="triton")
    with pytest.raises(TypeError, match="gamma must be a floating tensor"):
        call(z, ffn, gamma.long(), 2, backend="triton")
    with pytest.raises(ValueError, match="output_size must be"):
        call(z, ffn, gamma, (2, 0), backend="triton")
    with pytest.raises(ValueError, match="H >= 1 and W >= 1"):
        call(z[:, :0], ffn[:, :0], gamma, 2, backend="triton")


def test_torch_backend_is_the_reference():
    z, ffn, gamma = _inputs((2, 4, 6, 5, 2, 3), torch.float32, "cpu")
    expected = F.adaptive_max_pool2d((z + gamma * ffn).permute(0, 3, 1, 2), (2, 3))
    assert torch.equal(scale_residual_max_pool(z, ffn, gamma, (2, 3), backend="torch"), expected)


def test_opcheck(device):
    z, ffn, gamma = (t.requires_grad_() for t in _inputs((2, 3, 7, 9, 3, 4), torch.float32, device))
    torch.library.opcheck(FUSED_OP, (z, ffn, gamma, [3, 4], "triton"))
    _, indices, picked = FUSED_OP(z, ffn, gamma, [3, 4], "triton")
    grad_y = torch.randn(2, 3, 3, 4, device=device).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(BACKWARD_OP, (grad_y, gamma.detach(), indices, picked, [7, 9], "triton"))


def test_torch_compile_fullgraph(device):
    z, ffn, gamma = _inputs((2, 3, 7, 9, 3, 4), torch.float32, device)

    # Through the custom op: resolve_backend cannot be traced by dynamo yet (see test_adaptive_pool.py).
    def loss(z, ffn, gamma):
        return FUSED_OP(z, ffn, gamma, [3, 4], "triton")[0].square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (z, ffn, gamma)]
    compiled(*leaves).backward()
    y, _ = _reference(z, ffn, gamma, (3, 4), torch.zeros(2, 3, 3, 4, device=device))
    _, expected_grads = _reference(z, ffn, gamma, (3, 4), 2 * y)
    for leaf, expected in zip(leaves, expected_grads):
        assert_close(leaf.grad, expected, torch.float32, "compiled grad")


def test_cuda_selection_runs_the_triton_kernels(device, monkeypatch, caplog):
    """There is no CUDA kernel for this fusion: a process set to "cuda" gets Triton's (and is told so)."""
    # The package re-exports a function of the module's name, so fetch the module itself.
    fused_ops = importlib.import_module("deco_kernels.ops.scale_residual_max_pool")
    monkeypatch.setattr(fused_ops, "resolve_backend", lambda device, backend, op: "cuda")
    monkeypatch.setattr(fused_ops, "_substitution_logged", set())
    launched = []
    triton_forward = triton_fused.scale_residual_max_pool_forward
    monkeypatch.setattr(
        triton_fused, "scale_residual_max_pool_forward", lambda *args: launched.append(1) or triton_forward(*args)
    )
    z, ffn, gamma = _inputs((2, 3, 7, 9, 3, 4), torch.float32, device)
    with caplog.at_level("INFO", logger="deco_kernels"):
        y = scale_residual_max_pool(z, ffn, gamma, (3, 4), backend="cuda")
    assert launched == [1]
    assert "no CUDA kernel" in caplog.text
    assert_close(y, _reference(z, ffn, gamma, (3, 4), torch.zeros(2, 3, 3, 4, device=device))[0], torch.float32, "y")
