"""Shared test set-up.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter, which must be switched on before
anything imports triton (torch._dynamo does), so it is set here, first.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none present)")

# (device, backend) pairs of the kernel tests: the Triton kernels run on CUDA tensors and, under the interpreter
# (no GPU), on CPU tensors; the CUDA kernels on the GPU and, through their CPU builds in deco_kernels._C, on CPU
# tensors.
KERNEL_TARGETS = [(device, backend) for device in ("cpu", "cuda") for backend in ("triton", "cuda")]


def target_skip_reason(device: str, backend: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or None when it can."""
    from deco_kernels import available_backends

    if device == "cuda" and not HAS_CUDA:
        return "needs a CUDA device (none present)"
    if backend not in available_backends(device):
        return f"backend {backend!r} cannot run on {device} here (available: {available_backends(device)})"
    return None


@pytest.fixture(params=KERNEL_TARGETS, ids=lambda pair: "-".join(pair))
def target(request):
    """(device, backend), skipped with the reason where that backend cannot run on that device here."""
    reason = target_skip_reason(*request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32: on a GPU cuDNN convolutions default to TF32 (10-bit mantissa), far outside the fp32
    tolerances the stock layers are compared with."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
