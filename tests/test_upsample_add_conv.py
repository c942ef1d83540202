"""deco_kernels.upsample_add_conv (the CIM front) against a float64 reference: forward and every gradient.

Same set-up as tests/test_depthwise_conv2d.py (interpreter on the CPU, CUDA tensors when a GPU is present,
outputs poisoned with NaN). The nearest-neighbour rule is checked exactly against F.interpolate, including
query grids larger than the memory (downsampling).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DTYPES, KERNEL_DEVICE, LAYOUTS, TARGETS, UPSAMPLE_ADD_CONV_CASES, assert_close, make_input
from test_depthwise_conv2d import check_op_against_reference, check_parameter_gradient_dtypes, make_parameters

import deco_kernels
from deco_kernels import reference
from deco_kernels.ops._common import poisoned_outputs
from deco_kernels.triton import depthwise_conv2d as triton_depthwise
from deco_kernels.triton import upsample_add_conv as triton_upsample_add_conv


def _op(backend):
    return lambda q, m, w, b: deco_kernels.upsample_add_conv(q, m, w, b, backend=backend)


def _inputs(case, dtype, query_layout, memory_layout, device):
    batch, channels, query_h, query_w, height, width, kh, kw = case
    query = make_input((batch, channels, query_h, query_w), dtype, query_layout, device=device)
    memory = make_input((batch, channels, height, width), dtype, memory_layout, device=device)
    return query, memory, *make_parameters(channels, kh, kw, device)


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", UPSAMPLE_ADD_CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference_fp32(case, layout, device, backend):
    query, memory, weight, bias = _inputs(case, torch.float32, layout, layout, device)
    grad_layout = "contiguous" if layout == "channels_last" else "channels_last"
    check_op_against_reference(_op(backend), reference.upsample_add_conv, [query, memory], [weight, bias],
                               torch.float32, grad_layout=grad_layout)


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("query_layout, memory_layout", [("contiguous", "channels_last"),
                                                         ("channels_last", "contiguous")])
def test_mixed_layouts(query_layout, memory_layout, device, backend):
    query, memory, weight, bias = _inputs(UPSAMPLE_ADD_CONV_CASES[5], torch.float32, query_layout,
                                          memory_layout, device)
    check_op_against_reference(_op(backend), reference.upsample_add_conv, [query, memory], [weight, bias],
                               torch.float32)


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("case", [UPSAMPLE_ADD_CONV_CASES[i] for i in (1, 6)],
                         ids=lambda c: "x".join(map(str, c)))
def test_matches_reference_low_precision(case, dtype, layout, device, backend):
    query, memory, weight, bias = _inputs(case, dtype, layout, layout, device)
    check_op_against_reference(_op(backend), reference.upsample_add_conv, [query, memory], [weight, bias],
                               dtype, grad_layout=layout)


@pytest.mark.parametrize("device, backend", TARGETS)
def test_parameters_in_other_dtypes_get_gradients_in_their_dtype(device, backend):
    query, memory, weight, bias = _inputs((2, 4, 3, 2, 7, 6, 5, 3), torch.float32, "contiguous", "contiguous", device)
    check_parameter_gradient_dtypes(
        _op(backend), reference.upsample_add_conv, [query, memory], [weight.to(torch.bfloat16), bias.half()]
    )


@pytest.mark.parametrize("tile", triton_depthwise.TILES, ids=lambda t: t.name)
def test_every_gpu_tile(tile, monkeypatch):
    """Each GPU tile config, forced (conv kernels and the query-gradient gather) over maps of several tiles."""
    monkeypatch.setattr(triton_depthwise, "tile_config", lambda t: tile)
    monkeypatch.setattr(triton_upsample_add_conv, "tile_config", lambda t: tile)
    channels = tile.block_c + 3 if tile.block_c > 1 else 2
    layout = "channels_last" if tile.block_c > 1 else "contiguous"
    height, width = tile.block_h + 3, tile.block_w + 5
    # A query grid larger than one tile, so that the gather also spans several tiles.
    case = (2, channels, tile.block_h + 1, tile.block_w + 1, height, width, 3, 3)
    query, memory, weight, bias = _inputs(case, torch.float32, layout, layout, KERNEL_DEVICE)
    check_op_against_reference(_op("triton"), reference.upsample_add_conv, [query, memory], [weight, bias],
                               torch.float32, grad_layout=layout)


# (query size, memory size) per axis: DECO's 10 -> 25/42, ratios whose fp32 scale rounds below the exact
# value (14 -> 20: 0.7f < 0.7), exact multiples, 1 -> n, and downsampling.
NEAREST_SIZES = [(10, 25), (10, 42), (14, 20), (7, 10), (3, 7), (5, 10), (1, 9), (6, 6), (25, 10), (7, 3),
                 (13, 5), (9, 1), (100, 167), (15, 50)]


@pytest.mark.parametrize("device, backend", TARGETS)
def test_nearest_rule_matches_interpolate_exactly(device, backend):
    """With a zero kernel the op returns u itself, which must equal F.interpolate bit for bit, and the query
    gradient is interpolate's backward (each query cell sums the output gradient over its footprint)."""
    for (query_h, height), (query_w, width) in zip(NEAREST_SIZES, reversed(NEAREST_SIZES)):
        query = torch.randn(1, 2, query_h, query_w, device=device, requires_grad=True)
        memory = torch.randn(1, 2, height, width, device=device)
        weight = torch.zeros(2, 1, 1, 1, device=device)
        upsampled = deco_kernels.upsample_add_conv(query, memory, weight, backend=backend)
        query64 = query.detach().double().requires_grad_()
        expected = F.interpolate(query64, size=(height, width), mode="nearest")
        where = f"query {query_h}x{query_w} -> memory {height}x{width}"
        assert torch.equal(upsampled, expected.float()), where
        grad_out = torch.randn(1, 2, height, width, device=device)
        upsampled.backward(grad_out)
        expected.backward(grad_out.double())
        assert_close(query.grad, query64.grad, torch.float32, f"query gradient, {where}")


@pytest.mark.parametrize("device, backend", TARGETS)
def test_expanded_output_gradient_and_partial_gradients(device, backend):
    query, memory, weight, bias = _inputs((2, 5, 3, 4, 7, 9, 5, 3), torch.float32, "channels_last",
                                          "contiguous", device)
    query.requires_grad_()
    weight.requires_grad_()
    deco_kernels.upsample_add_conv(query, memory, weight, bias, backend=backend).sum().backward()
    query64, weight64 = (t.detach().double().requires_grad_() for t in (query, weight))
    reference.upsample_add_conv(query64, memory.double(), weight64, bias.double()).sum().backward()
    assert_close(query.grad, query64.grad, torch.float32, "gradient of query")
    assert_close(weight.grad, weight64.grad, torch.float32, "gradient of weight")
    assert memory.grad is None and bias.grad is None


@pytest.mark.parametrize("device, backend", TARGETS)
def test_weight_gradient_is_deterministic(device, backend):
    query, memory, weight, bias = _inputs((3, 24, 10, 10, 25, 42, 9, 9), torch.float32, "channels_last",
                                          "channels_last", device)
    grad_out = torch.randn(memory.shape, device=device)
    grads = []
    for _ in range(2):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        q = query.clone().requires_grad_()
        deco_kernels.upsample_add_conv(q, memory, w, b, backend=backend).backward(grad_out)
        grads.append((w.grad, b.grad, q.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("device, backend", TARGETS)
def test_empty_batch(device, backend):
    query = torch.randn(0, 4, 2, 2, device=device, requires_grad=True)
    memory = torch.randn(0, 4, 5, 6, device=device, requires_grad=True)
    weight, bias = make_parameters(4, 3, 3, device)
    weight.requires_grad_()
    with poisoned_outputs():
        y = deco_kernels.upsample_add_conv(query, memory, weight, bias, backend=backend)
        assert y.shape == (0, 4, 5, 6)
        y.sum().backward()
    assert query.grad.shape == query.shape and memory.grad.shape == memory.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 3, 2, 2), (2, 3, 5, 5), (3, 1, 3, 3)), r"same batch size and channels"),
        (((1, 3, 2, 2), (1, 4, 5, 5), (3, 1, 3, 3)), r"same batch size and channels"),
        (((1, 3, 2), (1, 3, 5, 5), (3, 1, 3, 3)), r"query must be 4-D"),
        (((1, 3, 2, 2), (1, 3, 5, 5), (3, 1, 2, 3)), r"kernel size must be odd"),
        (((1, 3, 2, 2), (1, 3, 5, 5), (2, 1, 3, 3)), r"weight has 2 channels but the input has 3"),
    ],
    ids=["batch", "channels", "3d-query", "even-kernel", "weight-channels"],
)
def test_bad_shapes_are_named(shapes, match):
    query_shape, memory_shape, weight_shape = shapes
    with pytest.raises(ValueError, match=match):
        deco_kernels.upsample_add_conv(torch.randn(query_shape), torch.randn(memory_shape),
                                       torch.randn(weight_shape), backend="triton")


def test_mismatched_dtype_and_device_are_named():
    memory = torch.randn(1, 3, 5, 5)
    weight = torch.randn(3, 1, 3, 3)
    with pytest.raises(TypeError, match=r"query must have the same dtype as memory"):
        deco_kernels.upsample_add_conv(torch.randn(1, 3, 2, 2, dtype=torch.bfloat16), memory, weight)
    with pytest.raises(ValueError, match=r"query must be on the same device as memory"):
        deco_kernels.upsample_add_conv(torch.randn(1, 3, 2, 2, device="meta"), memory, weight)
