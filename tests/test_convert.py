"""Released-checkpoint conversion: key layout, strict loading, and outputs equal to an independent
re-statement of the released forward pass written here with plain functional calls on the released tensors."""

import argparse
import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from deco.cli import main as cli_main
from deco.evaluation import build_model_from_checkpoint, load_model_checkpoint
from deco.models import build_deco, convert_official_checkpoint, convert_official_state_dict, infer_official_config
from deco.models.backbone import build_backbone
from deco.models.convert import released_categories

# ---------------------------------------------------------------------------------------------------------------
# The released key layout, generated from the spec ("Checkpoint layout"), torchvision's ResNet naming and the
# release's ConvNeXt (models/backbone_convnext.py + convnext.py of xinghaochen/DECO: facebookresearch/ConvNeXt's
# names, the classifier's final norm and head removed).
# ---------------------------------------------------------------------------------------------------------------

RESNETS = {
    # name: (blocks per stage, bottleneck?)
    "resnet18": ((2, 2, 2, 2), False),
    "resnet50": ((3, 4, 6, 3), True),
}


def _bn_keys(prefix, channels):
    return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")}


def released_resnet_layout(name):
    """torchvision ResNet body keys (frozen BN: no num_batches_tracked) under ``backbone.0.body.``."""
    blocks, bottleneck = RESNETS[name]
    expansion = 4 if bottleneck else 1
    p = "backbone.0.body"
    layout = {f"{p}.conv1.weight": (64, 3, 7, 7), **_bn_keys(f"{p}.bn1", 64)}
    in_channels = 64
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for block in range(count):
            b = f"{p}.layer{stage}.{block}"
            if bottleneck:
                convs = [(width, in_channels, 1), (width, width, 3), (width * expansion, width, 1)]
            else:
                convs = [(width, in_channels, 3), (width, width, 3)]
            for index, (out_c, in_c, k) in enumerate(convs, start=1):
                layout[f"{b}.conv{index}.weight"] = (out_c, in_c, k, k)
                layout.update(_bn_keys(f"{b}.bn{index}", out_c))
            stride = 2 if stage > 1 and block == 0 else 1
            if stride != 1 or in_channels != width * expansion:
                layout[f"{b}.downsample.0.weight"] = (width * expansion, in_channels, 1, 1)
                layout.update(_bn_keys(f"{b}.downsample.1", width * expansion))
            in_channels = width * expansion
    return layout, in_channels


def _convnext_block_layout(prefix, dim):
    """One ConvNeXt block (the release's encoder blocks and its ConvNeXt backbone's): 7x7 depthwise, LN, 4x MLP."""
    return {
        f"{prefix}.dwconv.weight": (dim, 1, 7, 7), f"{prefix}.dwconv.bias": (dim,),
        f"{prefix}.norm.weight": (dim,), f"{prefix}.norm.bias": (dim,),
        f"{prefix}.pwconv1.weight": (4 * dim, dim), f"{prefix}.pwconv1.bias": (4 * dim,),
        f"{prefix}.pwconv2.weight": (dim, 4 * dim), f"{prefix}.pwconv2.bias": (dim,),
        f"{prefix}.gamma": (dim,),
    }


# ConvNeXt-T, as the release's convnext_tiny builds it: blocks and widths of the four stages.
CONVNEXT_TINY = {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)}


def released_convnext_layout(prefix="backbone.0.body.", depths=CONVNEXT_TINY["depths"], dims=CONVNEXT_TINY["dims"]):
    """The release's ConvNeXt body keys (facebookresearch/ConvNeXt's names; no final norm, no head): the stem
    (4x4 stride-4 conv, LayerNorm) is downsample_layers.0, the LayerNorm + 2x2 stride-2 conv before stages 1-3
    are downsample_layers.1-3, block B of stage S is stages.S.B. Returns (layout, output channels)."""
    layout = {
        f"{prefix}downsample_layers.0.0.weight": (dims[0], 3, 4, 4), f"{prefix}downsample_layers.0.0.bias": (dims[0],),
        f"{prefix}downsample_layers.0.1.weight": (dims[0],), f"{prefix}downsample_layers.0.1.bias": (dims[0],),
    }
    for stage in range(1, len(dims)):
        k = f"{prefix}downsample_layers.{stage}"
        layout.update({
            f"{k}.0.weight": (dims[stage - 1],), f"{k}.0.bias": (dims[stage - 1],),
            f"{k}.1.weight": (dims[stage], dims[stage - 1], 2, 2), f"{k}.1.bias": (dims[stage],),
        })
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        for block in range(depth):
            layout.update(_convnext_block_layout(f"{prefix}stages.{stage}.{block}", dim))
    return layout, dims[-1]


def released_layout(backbone="resnet18", num_classes=91, num_queries=100, d_model=480,
                    enc_dims=(120, 240, 480), enc_depths=(2, 6, 2), num_layers=6, ffn_ratio=4):
    if backbone == "convnext_tiny":
        layout, backbone_channels = released_convnext_layout()
    else:
        layout, backbone_channels = released_resnet_layout(backbone)
    layout["input_proj.weight"] = (enc_dims[0], backbone_channels, 1, 1)
    layout["input_proj.bias"] = (enc_dims[0],)
    layout["query_embed.weight"] = (num_queries, d_model)
    layout["deco_convnet.tgt.weight"] = (num_queries, d_model)
    enc = "deco_convnet.encoder._encoder"
    for s, (dim, depth) in enumerate(zip(enc_dims, enc_depths)):
        for b in range(depth):
            layout.update(_convnext_block_layout(f"{enc}.stages.{s}.{b}", dim))
    for s, (a, b) in enumerate(zip(enc_dims[:-1], enc_dims[1:])):
        k = f"{enc}.downsample_layers.{s}"
        layout.update({f"{k}.0.weight": (a,), f"{k}.0.bias": (a,), f"{k}.1.weight": (b, a, 1, 1), f"{k}.1.bias": (b,)})
    layout[f"{enc}.norm.weight"] = (enc_dims[-1],)
    layout[f"{enc}.norm.bias"] = (enc_dims[-1],)
    hidden = ffn_ratio * d_model
    for layer in range(num_layers):
        k = f"deco_convnet.decoder.layers.{layer}"
        for part in ("1", "2"):
            layout.update({
                f"{k}.dwconv{part}.weight": (d_model, 1, 9, 9), f"{k}.dwconv{part}.bias": (d_model,),
                f"{k}.norm{part}.weight": (d_model,), f"{k}.norm{part}.bias": (d_model,),
                f"{k}.pwconv{part}_1.weight": (hidden, d_model), f"{k}.pwconv{part}_1.bias": (hidden,),
                f"{k}.pwconv{part}_2.weight": (d_model, hidden), f"{k}.pwconv{part}_2.bias": (d_model,),
                f"{k}.gamma{part}": (d_model,),
            })
    layout["deco_convnet.decoder.norm.weight"] = (d_model,)
    layout["deco_convnet.decoder.norm.bias"] = (d_model,)
    for layer in range(num_layers):
        layout[f"class_embed.{layer}.weight"] = (num_classes, d_model)
        layout[f"class_embed.{layer}.bias"] = (num_classes,)
        for i, (out_d, in_d) in enumerate(((d_model, d_model), (d_model, d_model), (4, d_model))):
            for prefix in ("", "deco_convnet.decoder."):
                layout[f"{prefix}bbox_embed.{layer}.layers.{i}.weight"] = (out_d, in_d)
                layout[f"{prefix}bbox_embed.{layer}.layers.{i}.bias"] = (out_d,)
    return layout


def random_released_state_dict(layout, seed=0):
    """Random tensors of the released layout, scaled so activations stay O(1); duplicates are copies."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    state = {}
    for key, shape in layout.items():
        if key.startswith("deco_convnet.decoder.bbox_embed."):
            continue
        if key.endswith("running_var"):
            value = torch.rand(*shape, generator=generator) + 0.5
        elif key.endswith(("running_mean", ".bias")):
            value = 0.1 * randn(*shape)
        elif key.endswith("gamma"):
            # Far from the 1e-6 initialisation, so every FFN branch matters in the comparison.
            value = 0.5 * randn(*shape)
        elif len(shape) == 1:  # BN / LN weights
            value = 1 + 0.1 * randn(*shape)
        elif key.endswith(("query_embed.weight", "tgt.weight")):
            value = randn(*shape)
        else:
            fan_in = math.prod(shape[1:])
            value = randn(*shape) / math.sqrt(fan_in)
        state[key] = value
    for key in layout:
        if key.startswith("deco_convnet.decoder.bbox_embed."):
            state[key] = state[key.removeprefix("deco_convnet.decoder.")].clone()
    return state


# ---------------------------------------------------------------------------------------------------------------
# The released forward pass, restated functionally on the released tensors (no project code, no torchvision,
# no timm).
# ---------------------------------------------------------------------------------------------------------------


def _frozen_bn(x, sd, prefix):
    scale = sd[f"{prefix}.weight"] * (sd[f"{prefix}.running_var"] + 1e-5).rsqrt()
    shift = sd[f"{prefix}.bias"] - sd[f"{prefix}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _resnet(x, sd, name):
    p = "backbone.0.body"
    blocks, bottleneck = RESNETS[name]
    x = F.relu(_frozen_bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=2, padding=3), sd, f"{p}.bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for stage, count in enumerate(blocks, start=1):
        for block in range(count):
            b = f"{p}.layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            if bottleneck:  # torchvision puts the stride on the 3x3 conv
                y = F.relu(_frozen_bn(F.conv2d(x, sd[f"{b}.conv1.weight"]), sd, f"{b}.bn1"))
                y = F.relu(_frozen_bn(F.conv2d(y, sd[f"{b}.conv2.weight"], stride=stride, padding=1), sd, f"{b}.bn2"))
                y = _frozen_bn(F.conv2d(y, sd[f"{b}.conv3.weight"]), sd, f"{b}.bn3")
            else:
                y = F.relu(_frozen_bn(F.conv2d(x, sd[f"{b}.conv1.weight"], stride=stride, padding=1), sd, f"{b}.bn1"))
                y = _frozen_bn(F.conv2d(y, sd[f"{b}.conv2.weight"], padding=1), sd, f"{b}.bn2")
            if f"{b}.downsample.0.weight" in sd:
                x = _frozen_bn(F.conv2d(x, sd[f"{b}.downsample.0.weight"], stride=stride), sd, f"{b}.downsample.1")
            x = F.relu(x + y)
    return x


def _channels_last_ffn(x, sd, norm, fc1, fc2, gamma):
    """x: B x C x H x W -> gamma * fc2(gelu(fc1(LN(x)))), returned B x H x W x C, with the LN output."""
    x = x.permute(0, 2, 3, 1)
    z = F.layer_norm(x, x.shape[-1:], sd[f"{norm}.weight"], sd[f"{norm}.bias"], 1e-6)
    h = F.linear(F.gelu(F.linear(z, sd[f"{fc1}.weight"], sd[f"{fc1}.bias"])), sd[f"{fc2}.weight"], sd[f"{fc2}.bias"])
    return sd[gamma] * h, z


def _depthwise(x, sd, prefix):
    weight = sd[f"{prefix}.weight"]
    return F.conv2d(x, weight, sd[f"{prefix}.bias"], padding=weight.shape[-1] // 2, groups=x.shape[1])


def _channels_first_layer_norm(x, sd, prefix):
    """The release's channels-first LayerNorm (eps 1e-6) as its LayerNorm class writes it out. x: B x C x H x W."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + 1e-6)
    return sd[f"{prefix}.weight"][:, None, None] * x + sd[f"{prefix}.bias"][:, None, None]


def _convnext_block(x, sd, prefix):
    """x + gamma * pwconv2(gelu(pwconv1(LN(dwconv(x))))); x: B x C x H x W."""
    update, _ = _channels_last_ffn(_depthwise(x, sd, f"{prefix}.dwconv"), sd, f"{prefix}.norm", f"{prefix}.pwconv1",
                                   f"{prefix}.pwconv2", f"{prefix}.gamma")
    return x + update.permute(0, 3, 1, 2)


def _convnext(x, sd, prefix="backbone.0.body."):
    """The release's ConvNeXt forward (facebookresearch/ConvNeXt's forward_features without the final norm):
    B x 3 x H x W -> B x C x H/32 x W/32."""
    stage = 0
    while f"{prefix}downsample_layers.{stage}.0.weight" in sd:
        d = f"{prefix}downsample_layers.{stage}"
        if stage == 0:  # the stem: 4x4 stride-4 conv, then LayerNorm
            x = F.conv2d(x, sd[f"{d}.0.weight"], sd[f"{d}.0.bias"], stride=4)
            x = _channels_first_layer_norm(x, sd, f"{d}.1")
        else:  # LayerNorm, then 2x2 stride-2 conv
            x = _channels_first_layer_norm(x, sd, f"{d}.0")
            x = F.conv2d(x, sd[f"{d}.1.weight"], sd[f"{d}.1.bias"], stride=2)
        block = 0
        while f"{prefix}stages.{stage}.{block}.gamma" in sd:
            x = _convnext_block(x, sd, f"{prefix}stages.{stage}.{block}")
            block += 1
        stage += 1
    return x


def released_forward(images, sd, backbone, query_grid=(10, 10)):
    """The released DECO forward: dict of pred_logits / pred_boxes per decoder layer (list, last = final)."""
    x = _convnext(images, sd) if backbone == "convnext_tiny" else _resnet(images, sd, backbone)
    x = F.conv2d(x, sd["input_proj.weight"], sd["input_proj.bias"])
    enc = "deco_convnet.encoder._encoder"
    stage = 0
    while f"{enc}.stages.{stage}.0.gamma" in sd:
        if stage > 0:
            ds = f"{enc}.downsample_layers.{stage - 1}"
            x = _channels_first_layer_norm(x, sd, f"{ds}.0")
            x = F.conv2d(x, sd[f"{ds}.1.weight"], sd[f"{ds}.1.bias"])
        block = 0
        while f"{enc}.stages.{stage}.{block}.gamma" in sd:
            x = _convnext_block(x, sd, f"{enc}.stages.{stage}.{block}")
            block += 1
        stage += 1
    memory = x
    batch, d_model, height, width = memory.shape
    qh, qw = query_grid

    def as_grid(embedding):  # Q x d -> B x d x qh x qw as the release does it
        return embedding.unsqueeze(1).repeat(1, batch, 1).permute(1, 2, 0).reshape(batch, d_model, qh, qw)

    tgt, query_pos = as_grid(sd["deco_convnet.tgt.weight"]), as_grid(sd["query_embed.weight"])
    outputs = []
    layer = 0
    while f"deco_convnet.decoder.layers.{layer}.gamma1" in sd:
        k = f"deco_convnet.decoder.layers.{layer}"
        update, _ = _channels_last_ffn(_depthwise(tgt + query_pos, sd, f"{k}.dwconv1"), sd, f"{k}.norm1",
                                       f"{k}.pwconv1_1", f"{k}.pwconv1_2", f"{k}.gamma1")
        tgt = tgt + update.permute(0, 3, 1, 2)
        up = F.interpolate(tgt, size=[height, width])
        fused = _depthwise(up + memory, sd, f"{k}.dwconv2") + up
        update, z = _channels_last_ffn(fused, sd, f"{k}.norm2", f"{k}.pwconv2_1", f"{k}.pwconv2_2", f"{k}.gamma2")
        tgt = F.adaptive_max_pool2d((z + update).permute(0, 3, 1, 2), (qh, qw))
        hs = tgt.flatten(2).permute(0, 2, 1)
        hs = F.layer_norm(hs, (d_model,), sd["deco_convnet.decoder.norm.weight"], sd["deco_convnet.decoder.norm.bias"])
        logits = F.linear(hs, sd[f"class_embed.{layer}.weight"], sd[f"class_embed.{layer}.bias"])
        h = hs
        for i in range(3):
            h = F.linear(h, sd[f"bbox_embed.{layer}.layers.{i}.weight"], sd[f"bbox_embed.{layer}.layers.{i}.bias"])
            h = F.relu(h) if i < 2 else h
        outputs.append({"pred_logits": logits, "pred_boxes": h.sigmoid()})
        layer += 1
    return outputs


def _relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


# ---------------------------------------------------------------------------------------------------------------


def test_released_layout_has_563_keys_for_r50_and_converts_to_a_strict_load():
    layout = released_layout("resnet50")
    assert len(layout) == 563
    state = {key: torch.zeros(shape) for key, shape in layout.items()}
    config = infer_official_config(state)
    assert config["backbone"] == "resnet50" and config["query_grid"] == (10, 10)
    assert config["encoder_dims"] == (120, 240, 480) and config["encoder_depths"] == (2, 6, 2)
    converted = convert_official_state_dict(state)
    assert len(converted) == 563 - 36  # the 36 duplicated box-head tensors are dropped
    with torch.device("meta"):
        model = build_deco(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    # The released encoder + decoder count: everything in them but the positional queries.
    released_encoder_decoder = [k for k in layout if k.startswith("deco_convnet.") and ".bbox_embed." not in k]
    assert sum(math.prod(layout[k]) for k in released_encoder_decoder) == 29_666_880


def _compare_with_released_forward(released, backbone, images, query_grid=(10, 10)):
    config = infer_official_config(released, query_grid)
    assert config["backbone"] == backbone
    model = build_deco(**config).eval()
    model.load_state_dict(convert_official_state_dict(released, query_grid), strict=True)
    with torch.no_grad():
        ours = model(images)
        expected = released_forward(images, released, backbone, query_grid)
    ours_per_layer = ours["aux_outputs"] + [{"pred_logits": ours["pred_logits"], "pred_boxes": ours["pred_boxes"]}]
    assert len(ours_per_layer) == len(expected) == config["num_decoder_layers"]
    for layer, (mine, theirs) in enumerate(zip(ours_per_layer, expected)):
        for name in ("pred_logits", "pred_boxes"):
            # Boxes are non-trivial (not all sigmoid(-2)) because the random heads are not zero-initialised.
            assert theirs[name].std() > 1e-3
            error = _relative_error(mine[name], theirs[name])
            assert error < 1e-4, f"layer {layer} {name}: relative error {error:.2e}"


def test_released_r18_matches_independent_released_forward():
    """The full released DECO-R18; the 2 x 11 memory map makes the CIM pooling windows overlap."""
    released = random_released_state_dict(released_layout("resnet18"))
    _compare_with_released_forward(released, "resnet18", torch.randn(2, 3, 64, 352))


def test_r50_bottleneck_backbone_converts_and_matches_with_a_small_head():
    """ResNet-50 (bottleneck blocks, downsample in layer1) with a small encoder/decoder, odd input size."""
    layout = released_layout("resnet50", num_classes=7, d_model=32, enc_dims=(16, 32), enc_depths=(1, 2), num_layers=2)
    _compare_with_released_forward(random_released_state_dict(layout), "resnet50", torch.randn(1, 3, 65, 97))


def test_released_convnext_tiny_layout_has_476_keys_and_converts_to_a_strict_load():
    """The R50 release's 563 keys less its 265 backbone keys, plus ConvNeXt-T's 178: stem and three downsampling
    layers (4 tensors each) and 18 blocks (9 tensors each); input_proj takes 768 channels."""
    layout = released_layout("convnext_tiny")
    assert len(layout) == 476 == 563 - len(released_resnet_layout("resnet50")[0]) + 4 * 4 + 18 * 9
    state = {key: torch.zeros(shape) for key, shape in layout.items()}
    config = infer_official_config(state)
    assert config["backbone"] == "convnext_tiny"
    assert config["encoder_dims"] == (120, 240, 480) and config["encoder_depths"] == (2, 6, 2)
    converted = convert_official_state_dict(state)
    assert len(converted) == 476 - 36  # the 36 duplicated box-head tensors are dropped
    assert converted["input_proj.weight"].shape == (120, 768, 1, 1)
    with torch.device("meta"):
        model = build_deco(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    # The released model's parameter count (every tensor once; the release has no buffers besides frozen-BN ones,
    # which ConvNeXt does not use) is our model's.
    assert sum(t.numel() for t in converted.values()) == sum(p.numel() for p in model.parameters()) == 60_670_482


def test_released_convnext_tiny_matches_independent_released_forward():
    """The full released DECO-ConvNeXt-T; the 2 x 11 memory map makes the CIM pooling windows overlap."""
    released = random_released_state_dict(released_layout("convnext_tiny"))
    _compare_with_released_forward(released, "convnext_tiny", torch.randn(2, 3, 64, 352))


def test_convnext_tiny_with_a_small_head_converts_through_the_cli_and_matches(tmp_path):
    """ConvNeXt-T with a small encoder/decoder and an odd input size, through ``deco convert`` and the
    evaluation side's checkpoint loader: the backbone is detected from the keys alone."""
    layout = released_layout("convnext_tiny", num_classes=7, d_model=32, enc_dims=(16, 32), enc_depths=(1, 1),
                             num_layers=2)
    released = random_released_state_dict(layout, seed=1)
    torch.save({"model": released, "epoch": 149}, tmp_path / "released.pth")
    assert cli_main(["convert", str(tmp_path / "released.pth"), str(tmp_path / "converted.pth")]) == 0
    checkpoint = load_model_checkpoint(tmp_path / "converted.pth")
    assert checkpoint["model_config"]["backbone"] == "convnext_tiny"
    model = build_model_from_checkpoint(checkpoint).eval()
    images = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        ours = model(images)
        expected = released_forward(images, released, "convnext_tiny")[-1]
    for name in ("pred_logits", "pred_boxes"):
        assert expected[name].std() > 1e-3
        assert _relative_error(ours[name], expected[name]) < 1e-4


def test_imagenet_convnext_file_in_the_releases_layout_loads_as_backbone_weights(tmp_path):
    """The ImageNet weights the release trains from (facebookresearch/ConvNeXt's layout, under "model", with the
    classifier's final norm and head) load into our timm-named backbone; its features equal the release's."""
    layout, channels = released_convnext_layout(prefix="")
    layout.update({"norm.weight": (channels,), "norm.bias": (channels,), "head.weight": (1000, channels),
                   "head.bias": (1000,)})
    imagenet = random_released_state_dict(layout, seed=2)
    torch.save({"model": imagenet}, tmp_path / "convnext_tiny_1k_224_ema.pth")
    # build_backbone is what build_deco(backbone_weights=...) calls.
    backbone = build_backbone("convnext_tiny", weights=str(tmp_path / "convnext_tiny_1k_224_ema.pth"))
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features, _ = backbone(images, torch.zeros(1, 64, 96, dtype=torch.bool))
        expected = _convnext(images, imagenet, prefix="")
    assert features.shape == expected.shape == (1, 768, 2, 3)
    assert _relative_error(features, expected) < 1e-4

    torch.save({"model": {**imagenet, "stages.0.0.extra.weight": torch.zeros(1)}}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \['stages\.0\.0\.extra\.weight'\]"):
        build_backbone("convnext_tiny", weights=str(tmp_path / "extra.pth"))
    partial = {k: v for k, v in imagenet.items() if k != "stages.2.8.gamma"}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \['stages\.2\.blocks\.8\.gamma'\]"):
        build_backbone("convnext_tiny", weights=str(tmp_path / "partial.pth"))


def _small_released_convnext():
    """A released-layout DECO-ConvNeXt-T with a small encoder/decoder, all zeros."""
    layout = released_layout("convnext_tiny", num_classes=5, d_model=32, enc_dims=(16, 32), enc_depths=(1, 1),
                             num_layers=2)
    return {key: torch.zeros(shape) for key, shape in layout.items()}


def test_convnext_conversion_errors_name_what_they_found():
    released = _small_released_convnext()
    with pytest.raises(ValueError, match=r"unknown keys \['backbone\.0\.body\.stages\.0\.0\.extra\.weight'\]"):
        convert_official_state_dict({**released, "backbone.0.body.stages.0.0.extra.weight": torch.zeros(1)})
    missing = {k: v for k, v in released.items() if k != "backbone.0.body.stages.2.8.gamma"}
    with pytest.raises(ValueError, match=r"missing \(our names\) \['backbone\.body\.stages\.2\.blocks\.8\.gamma'\]"):
        convert_official_state_dict(missing)
    # ConvNeXt-S (27 blocks in stage 2, the same widths) is a ConvNeXt, but not the supported one; the backbone
    # is inferred before anything is compared, so shapes (meta tensors) suffice.
    convnext_small, _ = released_convnext_layout(depths=(3, 3, 27, 3))
    not_tiny = {k: v for k, v in released.items() if not k.startswith("backbone.0.body.")}
    not_tiny.update({key: torch.empty(shape, device="meta") for key, shape in convnext_small.items()})
    with pytest.raises(
        ValueError,
        match=r"the backbone is a ConvNeXt with depths \(3, 3, 27, 3\) and widths \(96, 192, 384, 768\); "
        r"only ConvNeXt-T \(depths \(3, 3, 9, 3\)",
    ):
        convert_official_state_dict(not_tiny)
    # Backbone keys that fit neither variant, e.g. torchvision's ConvNeXt names (features.*).
    torchvision_named = {k: v for k, v in released.items() if not k.startswith("backbone.0.body.")}
    torchvision_named["backbone.0.body.features.0.0.weight"] = torch.empty(96, 3, 4, 4, device="meta")
    torchvision_named["backbone.0.body.features.1.0.layer_scale"] = torch.empty(96, 1, 1, device="meta")
    with pytest.raises(
        ValueError,
        match=r"cannot tell the backbone; its keys fit neither ResNet-18/50 .* nor ConvNeXt-T .*: found 2 backbone "
        r"keys under backbone\.0\.body\.\{features\} \(first: 'backbone\.0\.body\.features\.0\.0\.weight'\)",
    ):
        convert_official_state_dict(torchvision_named)
    no_backbone = {k: v for k, v in released.items() if not k.startswith("backbone.0.body.")}
    with pytest.raises(ValueError, match=r"cannot tell the backbone; .*: found no backbone\.0\.body\.\* keys"):
        infer_official_config(no_backbone)


def _small_released(num_queries=100):
    return random_released_state_dict(
        released_layout("resnet18", num_classes=5, num_queries=num_queries, d_model=32, enc_dims=(16, 32),
                        enc_depths=(1, 1), num_layers=2)
    )


def test_small_configuration_is_inferred_and_matches_with_another_query_grid():
    released = _small_released(num_queries=300)
    config = infer_official_config(released, query_grid=(15, 20))
    assert config == {
        "backbone": "resnet18", "num_classes": 5, "num_queries": 300, "query_grid": (15, 20), "d_model": 32,
        "encoder_dims": (16, 32), "encoder_depths": (1, 1), "num_decoder_layers": 2, "ffn_ratio": 4,
    }
    _compare_with_released_forward(released, "resnet18", torch.randn(2, 3, 64, 96), query_grid=(15, 20))


def test_conversion_errors_name_the_key():
    released = _small_released()
    with pytest.raises(ValueError, match=r"unknown keys \['deco_convnet\.extra\.weight'\]"):
        convert_official_state_dict({**released, "deco_convnet.extra.weight": torch.zeros(1)})
    missing = dict(released)
    del missing["deco_convnet.decoder.layers.1.gamma2"]
    with pytest.raises(ValueError, match=r"missing \(our names\) \['decoder\.layers\.1\.cim\.ffn\.gamma'\]"):
        convert_official_state_dict(missing)
    reshaped = {**released, "input_proj.weight": torch.zeros(16, 512, 3, 3)}
    with pytest.raises(ValueError, match=r"shape mismatch for 'input_proj\.weight': \(16, 512, 3, 3\)"):
        convert_official_state_dict(reshaped)
    tampered = dict(released)
    tampered["deco_convnet.decoder.bbox_embed.1.layers.2.bias"] = torch.ones(4)
    with pytest.raises(ValueError, match=r"'deco_convnet\.decoder\.bbox_embed\.1\.layers\.2\.bias' differs"):
        convert_official_state_dict(tampered)
    no_backbone = {k: v for k, v in released.items() if not k.startswith("backbone.0.body.layer4")}
    with pytest.raises(ValueError, match="cannot tell the backbone"):
        convert_official_state_dict(no_backbone)
    with pytest.raises(ValueError, match="query_grid must be given: 125 queries"):
        infer_official_config({**released, "query_embed.weight": torch.zeros(125, 32)})


class _Opaque:
    """A Python object that weights-only loading refuses."""


def test_coco_categories_of_a_released_model():
    categories = released_categories(91)
    assert [c["id"] for c in categories] == list(range(91))
    named = [c for c in categories if c["name"] != "N/A"]
    assert len(named) == 80
    assert categories[1]["name"] == "person" and categories[90]["name"] == "toothbrush"
    assert [c["id"] for c in categories if c["name"] == "N/A"] == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


def test_checkpoint_file_and_cli(tmp_path):
    released = _small_released()
    src = tmp_path / "released.pth"
    # As in DETR-style releases: training arguments and other state next to the model.
    torch.save({"model": released, "epoch": 149, "args": argparse.Namespace(lr=1e-4, backbone="resnet18")}, src)
    dst = tmp_path / "converted.pth"
    assert cli_main(["convert", str(src), str(dst)]) == 0
    converted = torch.load(dst, weights_only=True)
    assert sorted(converted) == ["categories", "model", "model_config"]
    assert converted["categories"] == [{"id": i, "name": f"class {i}"} for i in range(5)]
    model = build_deco(**converted["model_config"])
    model.load_state_dict(converted["model"], strict=True)
    torch.testing.assert_close(model.decoder.query_pos.weight, released["query_embed.weight"], rtol=0, atol=0)
    # The evaluation/prediction side reads the same file.
    loaded = build_model_from_checkpoint(load_model_checkpoint(dst))
    assert torch.equal(loaded.heads.class_embed[1].weight, released["class_embed.1.weight"])
    assert sorted(os.listdir(tmp_path)) == ["converted.pth", "released.pth"]  # no temporary file left

    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": released}, bad)
    with pytest.raises(ValueError, match=r"expected a released checkpoint with a 'model' entry; found \['state_dict'\]"):
        convert_official_checkpoint(bad, tmp_path / "out.pth")
    assert cli_main(["convert", str(bad), str(tmp_path / "out.pth")]) == 1
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        convert_official_checkpoint(tmp_path / "absent.pth", tmp_path / "out.pth")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": released, "extra": OrderedDict(note=_Opaque())}, pickled)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        convert_official_checkpoint(pickled, tmp_path / "out.pth")
    assert convert_official_checkpoint(pickled, tmp_path / "trusted.pth", trust_pickle=True)["backbone"] == "resnet18"
    os.unlink(tmp_path / "trusted.pth")
    unknown = tmp_path / "unknown.pth"
    torch.save({"model": {**released, "mystery": torch.zeros(1)}}, unknown)
    with pytest.raises(ValueError, match="unknown keys"):
        convert_official_checkpoint(unknown, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".convert-")]
