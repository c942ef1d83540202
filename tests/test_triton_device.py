"""Triton launches on the current CUDA device: every Triton primitive makes its input's device current first."""

from __future__ import annotations

import contextlib
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import deco_kernels
from deco_kernels import _cuda
from deco_kernels.triton import on_input_device

_TRITON_MODULES = ("adaptive_pool", "depthwise_conv2d", "depthwise_conv2d_layernorm", "scale_residual_max_pool",
                   "upsample_add_conv")
# The primitive contract: the functions both backends provide (deco_kernels._cuda lists them).
_PRIMITIVES = sorted(set(_cuda.__all__) - {"is_available", "load_error"})


def test_every_triton_primitive_runs_on_its_input_device():
    found = {}
    for name in _TRITON_MODULES:
        module = importlib.import_module(f"deco_kernels.triton.{name}")
        for primitive in _PRIMITIVES:
            fn = getattr(module, primitive, None)
            if fn is not None and getattr(fn, "__wrapped__", fn).__module__ == module.__name__:
                found[primitive] = fn
    assert sorted(found) == _PRIMITIVES
    for primitive, fn in found.items():
        assert fn.__code__ is on_input_device(lambda t: t).__code__, f"{primitive} is not wrapped by on_input_device"


def test_on_input_device_switches_only_when_needed(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(which):
        entered.append(which)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    primitive = on_input_device(lambda first, second: (first, second))
    for index in (0, 1):
        first = SimpleNamespace(device=torch.device("cuda", index))
        assert primitive(first, 7) == (first, 7)
    assert primitive(torch.ones(1), 7)[1] == 7
    assert entered == [torch.device("cuda", 1)]  # cuda:0 is current already; CPU tensors need no device


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_conv_on_a_device_that_is_not_current():
    torch.cuda.set_device(0)
    x = torch.randn(2, 8, 12, 13, device="cuda:1", requires_grad=True)
    weight = torch.randn(8, 1, 5, 5, device="cuda:1", requires_grad=True)
    y = deco_kernels.depthwise_conv2d(x, weight, backend="triton")
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x_ref = x.detach().double().requires_grad_()
    y_ref = F.conv2d(x_ref, weight.detach().double(), padding=2, groups=8)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-4, atol=1e-3)
