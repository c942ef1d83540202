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


# The forward ops whose leading arguments are B x C x H x W feature maps, and how many of them.
_MAP_ARGUMENTS = {"depthwise_conv2d_layernorm": 1, "upsample_add_conv": 2}


class _CountDecoKernelsOps(TorchDispatchMode):
    """Counts the calls of each ``deco_kernels::*`` custom op (forward and backward ops) under it, and
    records the memory formats of the feature maps the forward ops receive."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.map_formats = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "deco_kernels":
            name = func.overloadpacket.__name__
            self.calls[name] += 1
            for feature_map in args[: _MAP_ARGUMENTS.get(name, 0)]:
                self.map_formats.add(_memory_format_of(feature_map))
        return func(*args, **(kwargs or {}))


def _memory_format_of(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "nchw"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


def _flatten(outputs) -> list[torch.Tensor]:
    flat = [outputs["pred_logits"], outputs["pred_boxes"]]
    for aux in outputs["aux_outputs"]:
        flat += [aux["pred_logits"], aux["pred_boxes"]]
    return flat


def _assert_results_close(actual, actual_grads, expected, expected_grads, what: str) -> None:
    for index, (out, ref) in enumerate(zip(actual, expected)):
        assert_close(out, ref, torch.float32, f"{what} output {index}")
    assert set(actual_grads) == set(expected_grads)
    for name, grad in actual_grads.items():
        assert_close(grad, expected_grads[name], torch.float32, f"{what} gradient of {name}")


def _run(model, images, weights):
    model.zero_grad()
    flat = _flatten(model(images))
    loss = sum((out * weight.to(out.dtype)).sum() for out, weight in zip(flat, weights))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return flat, grads


def _skip_unless_available(backend: str) -> None:
    if backend not in deco_kernels.available_backends(KERNEL_DEVICE):
        pytest.skip(f"backend {backend!r} cannot run on {KERNEL_DEVICE} here")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_model_matches_stock(backend, channels_last):
    """Also channels-last (``model.to(memory_format=torch.channels_last)``, as ``deco train --channels-last``):
    every map from the backbone on, the query maps included, then reaches the kernels channels-last.

    The backbone is frozen. Its ReLUs make its weight gradients discontinuous: a pre-activation within fp32
    rounding of zero (seen: 3e-7 in layer3 with channels-last convolutions) takes the other side of the kink
    than in float64 and moves those gradients by percents, whatever the kernels do. Its output is continuous
    and still feeds everything checked here."""
    _skip_unless_available(backend)
    torch.manual_seed(0)
    frozen_backbone = {**TINY, "freeze_backbone_stages": 4}
    stock = models.build_deco(kernels="stock", **frozen_backbone).to(KERNEL_DEVICE)
    fused = models.build_deco(kernels="fused", **frozen_backbone).to(KERNEL_DEVICE)
    for module_class in (fused_nn.DepthwiseConv2d, fused_nn.UpsampleAddConv, fused_nn.ScaleResidualMaxPool2d):
        assert any(isinstance(module, module_class) for module in fused.modules()), module_class.__name__
    assert list(fused.state_dict()) == list(stock.state_dict())
    fused.load_state_dict(stock.state_dict())
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 96, device=KERNEL_DEVICE)
    with torch.no_grad():
        weights = [torch.randn_like(out) for out in _flatten(stock(images))]

    stock64 = stock.double()
    expected, expected_grads = _run(stock64, images.double(), weights)
    with deco_kernels.use_backend(backend), _CountDecoKernelsOps() as counter:
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
    if channels_last:
        assert counter.map_formats == {"channels_last"}

    _assert_results_close(actual, actual_grads, expected, expected_grads, "fused")


@pytest.mark.parametrize(
    "backend, compiler",
    [("triton", "aot_eager"), ("cuda", "aot_eager"), ("cuda", "inductor")],
    ids=["triton-aot_eager", "cuda-aot_eager", "cuda-inductor"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_model_compiles_as_one_graph(backend, compiler, channels_last):
    """torch.compile(fullgraph=True) of the whole fused model, in either layout: every kernel op traces (no graph
    break), and the compiled training step equals eager. aot_eager compiles the graph and runs its ops as they
    are; Inductor generates the code around the kernel ops, as the "fused-compile" benchmark rows run it (not
    with Triton's interpreter, which would take minutes). That the fake implementations give the kernels'
    output strides is opcheck's part (test_registration). On the CPU "cuda" is the extension's CPU build. The
    backbone is frozen, as in test_fused_model_matches_stock: Inductor's fused conv epilogues round
    differently, which can move a ReLU kink."""
    _skip_unless_available(backend)
    torch.manual_seed(0)
    model = models.build_deco(kernels="fused", **{**TINY, "freeze_backbone_stages": 4}).to(KERNEL_DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 96, device=KERNEL_DEVICE)
    with deco_kernels.use_backend(backend):
        with torch.no_grad():
            weights = [torch.randn_like(out) for out in _flatten(model(images))]
        expected, expected_grads = _run(model, images, weights)
        compiled = torch.compile(model, backend=compiler, fullgraph=True)
        actual, actual_grads = _run(compiled, images, weights)
    actual_grads = {name.removeprefix("_orig_mod."): grad for name, grad in actual_grads.items()}
    _assert_results_close(actual, actual_grads, expected, expected_grads, "compiled")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_channels_last_fused_model_copies_no_activation(backend):
    """Channels-last, a training step of the fused model (forward and backward) copies no feature map: the
    kernels read and write channels-last maps where they are, and their B x H x W x C outputs feed the
    Linear layers and LayerNorms without a transpose. (The images, 3 channels, are converted once.)"""
    _skip_unless_available(backend)
    torch.manual_seed(0)
    model = models.build_deco(kernels="fused", **TINY).to(KERNEL_DEVICE).to(memory_format=torch.channels_last)
    # Three images: the heads' L x B x Q x K outputs (L = 2 layers here) must not look like a batch of maps.
    images = torch.randn(3, 3, 64, 96, device=KERNEL_DEVICE)

    def step():
        outputs = _flatten(model(images))
        sum(out.sum() for out in outputs).backward()

    with deco_kernels.use_backend(backend):
        step()  # first calls: compilation, lazy initialisation
        with torch.profiler.profile(record_shapes=True) as profile:
            step()
    copies = [
        (event.name, shape)
        for event in profile.events()
        if event.name in ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous")
        for shape in event.input_shapes[:1]
        if len(shape) == 4 and shape[0] == images.shape[0] and min(shape[1:]) > 1 and shape[1] != 3
    ]
    assert copies == []
