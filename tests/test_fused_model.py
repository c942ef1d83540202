"""A tiny DECO built with kernels="fused" (deco_kernels.nn on the "triton" backend) against kernels="stock".

Same state_dict, fp32 inputs: the fused model's outputs and every parameter gradient must match the stock
model evaluated in float64 to the fp32 kernel tolerance. Under the interpreter on the CPU this runs the real
Triton kernels through the whole encoder and decoder (depthwise 7x7 and 9x9, the CIM's upsample-add-conv with
the query grid larger than the memory, the CIM back end pooling to a grid larger than the map); on a GPU
machine the same tests run on CUDA tensors (conftest turns TF32 off, so the stock layers are fp32 too).
"""

from __future__ import annotations

import collections

import pytest
import torch
from kernel_cases import KERNEL_DEVICE, assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import deco_kernels
from deco_kernels import nn as fused_nn

models = pytest.importorskip("deco.models", reason="deco.models.build_deco is not available")

TINY = dict(backbone="resnet18", num_queries=16, query_grid=(4, 4), d_model=64, encoder_dims=(32, 48, 64),
            encoder_depths=(1, 1, 1), num_decoder_layers=2)


class _CountDecoKernelsOps(TorchDispatchMode):
    """Counts the calls of each ``deco_kernels::*`` custom op (forward and backward ops) under it."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "deco_kernels":
            self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _flatten(outputs) -> list[torch.Tensor]:
    flat = [outputs["pred_logits"], outputs["pred_boxes"]]
    for aux in outputs["aux_outputs"]:
        flat += [aux["pred_logits"], aux["pred_boxes"]]
    return flat


def _run(model, images, weights):
    model.zero_grad()
    flat = _flatten(model(images))
    loss = sum((out * weight.to(out.dtype)).sum() for out, weight in zip(flat, weights))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return flat, grads


def test_fused_model_matches_stock():
    torch.manual_seed(0)
    stock = models.build_deco(kernels="stock", **TINY).to(KERNEL_DEVICE)
    fused = models.build_deco(kernels="fused", **TINY).to(KERNEL_DEVICE)
    for module_class in (fused_nn.DepthwiseConv2d, fused_nn.UpsampleAddConv, fused_nn.ScaleResidualMaxPool2d):
        assert any(isinstance(module, module_class) for module in fused.modules()), module_class.__name__
    assert list(fused.state_dict()) == list(stock.state_dict())
    fused.load_state_dict(stock.state_dict())
    images = torch.randn(2, 3, 64, 96, device=KERNEL_DEVICE)
    with torch.no_grad():
        weights = [torch.randn_like(out) for out in _flatten(stock(images))]

    stock64 = stock.double()
    expected, expected_grads = _run(stock64, images.double(), weights)
    with deco_kernels.use_backend("triton"), _CountDecoKernelsOps() as counter:
        actual, actual_grads = _run(fused.float(), images, weights)
    # Every encoder block and every SIM runs its dwconv + LayerNorm as the fused op, forward and backward,
    # and no depthwise conv runs on its own.
    fronts = sum(TINY["encoder_depths"]) + TINY["num_decoder_layers"]
    assert counter.calls["depthwise_conv2d_layernorm"] == fronts, counter.calls
    assert counter.calls["depthwise_conv2d_layernorm_backward"] == fronts, counter.calls
    assert counter.calls["depthwise_conv2d"] == 0, counter.calls
    # Every CIM runs its front (upsample + add + conv + residual) and its back end (layer scale + residual +
    # max pool) as one op each, and no max pool runs on its own.
    for op in ("upsample_add_conv", "upsample_add_conv_backward", "scale_residual_max_pool",
               "scale_residual_max_pool_backward"):
        assert counter.calls[op] == TINY["num_decoder_layers"], (op, counter.calls)
    assert counter.calls["adaptive_max_pool2d"] == 0, counter.calls

    for index, (out, ref) in enumerate(zip(actual, expected)):
        assert_close(out, ref, torch.float32, f"output {index}")
    assert set(actual_grads) == set(expected_grads)
    for name, grad in actual_grads.items():
        assert_close(grad, expected_grads[name], torch.float32, f"gradient of {name}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_model_compiles_as_one_graph(backend):
    """torch.compile(fullgraph=True) of the whole fused model: every kernel op traces (no graph break), and the
    compiled forward and gradients equal eager ones (aot_eager: the graph is compiled, the ops run as they
    are). On the CPU "cuda" is the extension's CPU build."""
    if backend not in deco_kernels.available_backends(KERNEL_DEVICE):
        pytest.skip(f"backend {backend!r} cannot run on {KERNEL_DEVICE} here")
    torch.manual_seed(0)
    model = models.build_deco(kernels="fused", **TINY).to(KERNEL_DEVICE)
    images = torch.randn(2, 3, 64, 96, device=KERNEL_DEVICE)
    with deco_kernels.use_backend(backend):
        with torch.no_grad():
            weights = [torch.randn_like(out) for out in _flatten(model(images))]
        expected, expected_grads = _run(model, images, weights)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        actual, actual_grads = _run(compiled, images, weights)
    actual_grads = {name.removeprefix("_orig_mod."): grad for name, grad in actual_grads.items()}
    for index, (out, ref) in enumerate(zip(actual, expected)):
        assert_close(out, ref, torch.float32, f"compiled output {index}")
    assert set(actual_grads) == set(expected_grads)
    for name, grad in actual_grads.items():
        assert_close(grad, expected_grads[name], torch.float32, f"compiled gradient of {name}")
