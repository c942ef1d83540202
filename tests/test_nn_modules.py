"""deco_kernels.nn: drop-in modules whose parameters (names, shapes, initialisation) are nn.Conv2d's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import KERNEL_DEVICE, assert_close
from torch import nn

import deco_kernels
from deco_kernels import nn as fused_nn
from deco_kernels import reference


def _depthwise_conv(channels, kernel_size, bias=True):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return nn.Conv2d(channels, channels, (kh, kw), padding=(kh // 2, kw // 2), groups=channels, bias=bias)


@pytest.mark.parametrize("module_class", [fused_nn.DepthwiseConv2d, fused_nn.UpsampleAddConv])
@pytest.mark.parametrize("kernel_size, bias", [(9, True), ((3, 7), False)])
def test_parameters_are_conv2d_parameters(module_class, kernel_size, bias):
    torch.manual_seed(1)
    module = module_class(6, kernel_size, bias=bias)
    torch.manual_seed(1)
    conv = _depthwise_conv(6, kernel_size, bias=bias)
    # Same names, shapes and (from the same seed) the same initial values as nn.Conv2d.
    assert list(module.state_dict()) == list(conv.state_dict())
    for name, tensor in conv.state_dict().items():
        assert torch.equal(module.state_dict()[name], tensor), name
    other = _depthwise_conv(6, kernel_size, bias=bias)
    module.load_state_dict(other.state_dict())
    assert torch.equal(module.weight, other.weight)
    conv.load_state_dict(module.state_dict())


def test_depthwise_forward_and_gradients_match_conv2d():
    conv = _depthwise_conv(5, 7).to(KERNEL_DEVICE)
    x = torch.randn(2, 5, 9, 11, device=KERNEL_DEVICE)
    expected = conv(x)
    expected.square().sum().backward()
    for backend in ("torch", "triton"):
        module = fused_nn.DepthwiseConv2d(5, 7, backend=backend, device=KERNEL_DEVICE)
        module.load_state_dict(conv.state_dict())
        out = module(x)
        out.square().sum().backward()
        assert_close(out, expected, torch.float32, f"{backend} output")
        assert_close(module.weight.grad, conv.weight.grad, torch.float32, f"{backend} weight gradient")
        assert_close(module.bias.grad, conv.bias.grad, torch.float32, f"{backend} bias gradient")


def test_forward_layer_norm_is_the_conv_then_the_norm():
    """DepthwiseConv2d.forward_layer_norm(x, norm) == norm(conv(x).permute(0, 2, 3, 1)), with every gradient."""
    conv = _depthwise_conv(5, 7).to(KERNEL_DEVICE)
    norm = nn.LayerNorm(5, eps=1e-6, device=KERNEL_DEVICE)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 9, 11, device=KERNEL_DEVICE)
    expected = norm(conv(x).permute(0, 2, 3, 1))
    expected.square().sum().backward()
    for backend in ("torch", "triton"):
        module = fused_nn.DepthwiseConv2d.from_conv2d(_depthwise_conv(5, 7), backend=backend).to(KERNEL_DEVICE)
        module.load_state_dict(conv.state_dict())
        module_norm = nn.LayerNorm(5, eps=1e-6, device=KERNEL_DEVICE)
        module_norm.load_state_dict(norm.state_dict())
        out = module.forward_layer_norm(x, module_norm)
        out.square().sum().backward()
        assert out.is_contiguous()
        assert_close(out, expected, torch.float32, f"{backend} output")
        for name, param in [*module.named_parameters(), *module_norm.named_parameters(prefix="norm")]:
            stock = dict([*conv.named_parameters(), *norm.named_parameters(prefix="norm")])[name]
            assert_close(param.grad, stock.grad, torch.float32, f"{backend} gradient of {name}")


@pytest.mark.parametrize("norm, match", [(nn.LayerNorm(4), r"nn.LayerNorm\(5\)"), (nn.BatchNorm1d(5), "LayerNorm"),
                                         (nn.LayerNorm(5, elementwise_affine=False), "weight and a bias")])
def test_forward_layer_norm_rejects_other_norms(norm, match):
    with pytest.raises(ValueError, match=match):
        fused_nn.DepthwiseConv2d(5, 3).forward_layer_norm(torch.randn(1, 5, 4, 4), norm)


def test_from_conv2d_shares_parameters():
    conv = _depthwise_conv(4, 5).to(KERNEL_DEVICE)
    module = fused_nn.DepthwiseConv2d.from_conv2d(conv, backend="triton")
    assert module.weight is conv.weight and module.bias is conv.bias
    x = torch.randn(1, 4, 6, 6, device=KERNEL_DEVICE)
    assert_close(module(x), conv(x), torch.float32, "from_conv2d output")
    cim = fused_nn.UpsampleAddConv.from_conv2d(conv, backend="triton")
    query = torch.randn(1, 4, 3, 3, device=KERNEL_DEVICE)
    expected = reference.upsample_add_conv(query, x, conv.weight, conv.bias)
    assert_close(cim(query, x), expected, torch.float32, "UpsampleAddConv output")


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4, stride=2),
     nn.Conv2d(4, 4, 3, padding=0, groups=4), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)],
    ids=["dense", "stride", "valid", "dilated"],
)
def test_from_conv2d_rejects_other_convolutions(conv):
    with pytest.raises(ValueError, match="must be depthwise"):
        fused_nn.DepthwiseConv2d.from_conv2d(conv)


@pytest.mark.parametrize("kernel_size, match", [(4, "kernel size must be odd"), ((3, 33), r"1\.\.31"),
                                                ((3, 3, 3), "int or a pair")])
def test_bad_kernel_size(kernel_size, match):
    with pytest.raises(ValueError, match=match):
        fused_nn.DepthwiseConv2d(3, kernel_size)


@pytest.mark.parametrize("module_class, stock_class", [(fused_nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool2d),
                                                       (fused_nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool2d)])
def test_pooling_modules_match_torch(module_class, stock_class):
    x = torch.randn(2, 3, 25, 14, device=KERNEL_DEVICE).contiguous(memory_format=torch.channels_last)
    for backend in ("torch", "triton"):
        out = module_class((10, 4), backend=backend)(x)
        assert_close(out, stock_class((10, 4))(x), torch.float32, f"{module_class.__name__} ({backend})")


def test_scale_residual_max_pool_module_matches_the_stock_cim_back_end():
    """The fused CIM back end and the model's stock one are the same function of (z, ffn, gamma)."""
    from deco.models.layers import StockScaleResidualMaxPool

    z, ffn, gamma = (torch.randn(*shape, dtype=torch.float64, device=KERNEL_DEVICE)
                     for shape in ((2, 25, 14, 3), (2, 25, 14, 3), (3,)))
    expected = StockScaleResidualMaxPool((10, 4))(z, ffn, gamma)
    assert torch.equal(expected, F.adaptive_max_pool2d((z + gamma * ffn).permute(0, 3, 1, 2), (10, 4)))
    for backend in ("torch", "triton"):
        out = fused_nn.ScaleResidualMaxPool2d((10, 4), backend=backend)(z.float(), ffn.float(), gamma.float())
        assert_close(out, expected, torch.float32, f"ScaleResidualMaxPool2d ({backend})")


def test_backend_follows_the_process_setting():
    """backend=None reads the process setting at call time, so a built model can be switched later."""
    module = fused_nn.UpsampleAddConv(2, 3, device=KERNEL_DEVICE)
    query, memory = torch.randn(1, 2, 2, 2, device=KERNEL_DEVICE), torch.randn(1, 2, 4, 5, device=KERNEL_DEVICE)
    with deco_kernels.use_backend("torch"):
        assert torch.equal(module(query, memory), reference.upsample_add_conv(query, memory, module.weight,
                                                                               module.bias))
    with deco_kernels.use_backend("triton"):
        out = module(query, memory)
    assert_close(out, F.conv2d(F.interpolate(query, size=(4, 5)) + memory, module.weight, module.bias,
                               padding=1, groups=2) + F.interpolate(query, size=(4, 5)), torch.float32, "output")
