"""Backbones: torchvision ResNet-18/50 (frozen BatchNorm) and timm ConvNeXt-T; only the last stage is used.

Parameter names under ``backbone.body`` are torchvision's ResNet names (``conv1``, ``bn1``, ``layer1``..``layer4``)
or timm's ConvNeXt names (``stem``, ``stages.S.downsample``, ``stages.S.blocks``), so their state dicts load
directly (``backbone_weights=``). A ConvNeXt file may also be in the layout of facebookresearch/ConvNeXt, which
the DECO release uses for its backbone and its ImageNet weights: :func:`convnext_timm_name` maps it.
Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

BACKBONES = ("resnet18", "resnet50", "convnext_tiny")
BACKBONE_NORMS = ("frozen", "batch")

# ConvNeXt-T: blocks and widths of its four stages.
CONVNEXT_TINY_DEPTHS = (3, 3, 9, 3)
CONVNEXT_TINY_DIMS = (96, 192, 384, 768)

# Keys of the classification head in a torchvision / timm state dict: present in their files, not used here.
_HEAD_PREFIXES = {"resnet18": ("fc.",), "resnet50": ("fc.",), "convnext_tiny": ("head.",)}
# The same in facebookresearch/ConvNeXt's layout: the final LayerNorm and the classifier, both ImageNet-only
# (the DECO release's ConvNeXt has neither and loads those files with strict=False).
_OFFICIAL_CONVNEXT_HEAD_PREFIXES = ("norm.", "head.")
# A key only facebookresearch/ConvNeXt's layout has: the stem conv.
_OFFICIAL_CONVNEXT_STEM_KEY = "downsample_layers.0.0.weight"

_WEIGHT_OR_BIAS = r"(weight|bias)"
# (facebookresearch/ConvNeXt name, timm name); every ConvNeXt body parameter matches exactly one.
_OFFICIAL_TO_TIMM_CONVNEXT: list[tuple[re.Pattern, str]] = [
    (re.compile(pattern), template)
    for pattern, template in [
        # The official layout keeps the stem as downsample layer 0; timm has a separate stem and puts the
        # LayerNorm + 2x2 stride-2 conv of stages 1-3 inside the stage.
        (rf"downsample_layers\.0\.([01])\.{_WEIGHT_OR_BIAS}", r"stem.\1.\2"),
        (rf"downsample_layers\.([123])\.([01])\.{_WEIGHT_OR_BIAS}", r"stages.\1.downsample.\2.\3"),
        (rf"stages\.(\d+)\.(\d+)\.dwconv\.{_WEIGHT_OR_BIAS}", r"stages.\1.blocks.\2.conv_dw.\3"),
        (rf"stages\.(\d+)\.(\d+)\.norm\.{_WEIGHT_OR_BIAS}", r"stages.\1.blocks.\2.norm.\3"),
        (rf"stages\.(\d+)\.(\d+)\.pwconv1\.{_WEIGHT_OR_BIAS}", r"stages.\1.blocks.\2.mlp.fc1.\3"),
        (rf"stages\.(\d+)\.(\d+)\.pwconv2\.{_WEIGHT_OR_BIAS}", r"stages.\1.blocks.\2.mlp.fc2.\3"),
        (r"stages\.(\d+)\.(\d+)\.gamma", r"stages.\1.blocks.\2.gamma"),
    ]
]


def convnext_timm_name(official_name: str) -> str:
    """A ConvNeXt body parameter name in facebookresearch/ConvNeXt's layout (the DECO release's) -> timm's.

    ``downsample_layers.0.{0,1}.*`` -> ``stem.{0,1}.*``; ``downsample_layers.S.{0,1}.*`` ->
    ``stages.S.downsample.{0,1}.*``; ``stages.S.B.{dwconv,norm,pwconv1,pwconv2}.*`` ->
    ``stages.S.blocks.B.{conv_dw,norm,mlp.fc1,mlp.fc2}.*``; ``stages.S.B.gamma`` -> ``stages.S.blocks.B.gamma``.
    The tensors need no change (depthwise C x 1 x 7 x 7, Linear out x in, 1-d norms and layer scales).
    Raises KeyError for a name outside that layout.
    """
    for pattern, template in _OFFICIAL_TO_TIMM_CONVNEXT:
        if pattern.fullmatch(official_name):
            return pattern.sub(template, official_name)
    raise KeyError(official_name)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters: ``y = x * scale + shift`` (eps 1e-5).

    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` (C) carry BatchNorm2d's names, so a
    torchvision state dict loads (its ``num_batches_tracked`` is ignored). x: B x C x H x W.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self._cache: dict[tuple, tuple] = {}  # (dtype, eps, inference mode) -> (key, buffers, (scale, shift))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _scale_and_shift(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale[None, :, None, None].to(dtype), shift[None, :, None, None].to(dtype)

    def _cached_scale_and_shift(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Recomputing them costs five kernel launches per layer and call (100 per ResNet-18 forward), and a batch-2
        # training step is bound by the host's launch work. They change only with a buffer: a new tensor (.to(),
        # assignment) or an in-place change (load_state_dict), which bumps the tensor's version. Inference-mode
        # tensors cannot be saved for a backward, so inference mode has its own entry.
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        key = (dtype, self.eps, torch.is_inference_mode_enabled(), *(buffer._version for buffer in buffers))
        cache = self._cache.get(key[:3])
        if cache is None or cache[0] != key or any(a is not b for a, b in zip(cache[1], buffers)):
            cache = self._cache[key[:3]] = (key, buffers, self._scale_and_shift(dtype))
        return cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            scale, shift = self._scale_and_shift(x.dtype)
        else:
            scale, shift = self._cached_scale_and_shift(x.dtype)
        return torch.addcmul(shift, x, scale)  # one kernel, where x * scale + shift is two

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ResNetBody(nn.Module):
    """A torchvision ResNet without its pooling and classifier: B x 3 x H x W -> B x C x H/32 x W/32."""

    def __init__(self, name: str, norm: str):
        super().__init__()
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.num_channels = resnet.fc.in_features

    def freeze_units(self) -> list[nn.Module | list[nn.Module]]:
        """The stem, then the stages, in order (the units that ``freeze_backbone_stages`` counts)."""
        return [[self.conv1, self.bn1], self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ConvNeXtBody(nn.Module):
    """timm's ConvNeXt-T stem and stages: B x 3 x H x W -> B x 768 x H/32 x W/32.

    The DECO release's ConvNeXt-T: a 4x4 stride-4 stem conv + LayerNorm, stages of depths 3/3/9/3 and widths
    96/192/384/768 joined by LayerNorm + 2x2 stride-2 conv, blocks ``x + gamma * fc2(GELU(fc1(LN(dwconv7x7(x)))))``,
    every LayerNorm with eps 1e-6, layer scale initialised to 1e-6, no drop path, and no LayerNorm after the last
    stage (timm's ``head.norm`` belongs to the classifier head, which is left out).
    """

    def __init__(self):
        super().__init__()
        import timm

        # pretrained=False: timm builds the architecture only and reads or downloads nothing.
        convnext = timm.create_model(
            "convnext_tiny", pretrained=False, depths=CONVNEXT_TINY_DEPTHS, dims=CONVNEXT_TINY_DIMS,
            drop_path_rate=0.0, ls_init_value=1e-6,
        )
        self.stem, self.stages = convnext.stem, convnext.stages
        self.num_channels = convnext.num_features

    def freeze_units(self) -> list[nn.Module | list[nn.Module]]:
        """The stem, then the stages, in order (the units that ``freeze_backbone_stages`` counts)."""
        return [self.stem, *self.stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class Backbone(nn.Module):
    """Image -> last-stage features and the padding mask resized to them.

    forward(images B x 3 x H x W, mask B x H x W bool (True = padding)) ->
    (features B x C x h x w, mask B x h x w bool). ``num_channels`` is C (512, 2048 or 768).
    The mask is resized with nearest interpolation as in the released model, which never uses it further.
    """

    def __init__(self, name: str = "resnet50", norm: str = "frozen", freeze_stages: int | None = None):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(map(repr, BACKBONES))}; got {name!r}")
        if norm not in BACKBONE_NORMS:
            raise ValueError(f"backbone_norm must be one of {', '.join(map(repr, BACKBONE_NORMS))}; got {norm!r}")
        self.name = name
        if name.startswith("resnet"):
            self.body = ResNetBody(name, norm)
        else:
            if norm != "frozen":
                raise ValueError(f"backbone_norm applies to ResNet backbones only (ConvNeXt uses LayerNorm); got {norm!r}")
            self.body = ConvNeXtBody()
        self.num_channels = self.body.num_channels
        if freeze_stages is None:
            # The release: ResNet stem and layer1 frozen; ConvNeXt fully trainable.
            freeze_stages = 1 if name.startswith("resnet") else 0
        units = self.body.freeze_units()
        if not isinstance(freeze_stages, int) or not 0 <= freeze_stages < len(units):
            raise ValueError(
                f"freeze_backbone_stages must be an int in 0..{len(units) - 1} (0: all trainable, n: the stem and "
                f"the first n stages frozen); got {freeze_stages!r}"
            )
        self.freeze_stages = freeze_stages
        if freeze_stages > 0:
            for unit in units[: freeze_stages + 1]:
                for module in unit if isinstance(unit, list) else [unit]:
                    module.requires_grad_(False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images)
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:])[0].to(torch.bool)
        return features, mask

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load a local torchvision (ResNet) or timm (ConvNeXt) state dict, strictly (classifier head ignored).

        A ConvNeXt file in facebookresearch/ConvNeXt's layout (e.g. ``convnext_tiny_1k_224_ema.pth``, which the
        DECO release trains from) is recognised by its stem key and renamed with :func:`convnext_timm_name`;
        its final LayerNorm and classifier are ignored.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"backbone_weights: no such file {os.fspath(path)!r}")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state_dict, Mapping) and "model" in state_dict and isinstance(state_dict["model"], Mapping):
            state_dict = state_dict["model"]
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"backbone_weights: {os.fspath(path)!r} does not hold a state dict")
        if self.name == "convnext_tiny" and _OFFICIAL_CONVNEXT_STEM_KEY in state_dict:
            body_state = {}
            for key, tensor in state_dict.items():
                if key.startswith(_OFFICIAL_CONVNEXT_HEAD_PREFIXES):
                    continue
                try:
                    body_state[convnext_timm_name(key)] = tensor
                except KeyError:
                    body_state[key] = tensor  # reported below as unexpected
        else:
            head = _HEAD_PREFIXES[self.name]
            body_state = {k: v for k, v in state_dict.items() if not k.startswith(head)}
        own = self.body.state_dict()
        # FrozenBatchNorm2d has no num_batches_tracked; a torchvision file does.
        ignorable = {k for k in body_state if k.endswith("num_batches_tracked") and k not in own}
        missing = sorted(set(own) - set(body_state))
        unexpected = sorted(set(body_state) - set(own) - ignorable)
        if missing or unexpected:
            raise ValueError(
                f"backbone_weights {os.fspath(path)!r} does not match a {self.name} body: "
                f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        for key, tensor in own.items():
            if body_state[key].shape != tensor.shape:
                raise ValueError(
                    f"backbone_weights: {key} has shape {tuple(body_state[key].shape)}, expected {tuple(tensor.shape)}"
                )
        self.body.load_state_dict({k: v for k, v in body_state.items() if k not in ignorable}, strict=True)


def check_images_and_mask(images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate a detector's inputs: images B x 3 x H x W floating point; mask B x H x W bool (True = padding).

    Returns the mask, all False (no padding) when ``mask`` is None.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a B x 3 x H x W tensor; got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor; got {images.dtype}")
    batch, _, height, width = images.shape
    if mask is None:
        mask = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
    elif mask.dtype != torch.bool or tuple(mask.shape) != (batch, height, width):
        raise ValueError(
            f"mask must be a bool tensor of shape {(batch, height, width)} (images' B x H x W); "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    return mask


def build_backbone(
    name: str = "resnet50", norm: str = "frozen", freeze_stages: int | None = None, weights: str | None = None
) -> Backbone:
    """The backbone of :func:`deco.models.build_deco`; ``weights`` is a local state-dict file or None."""
    backbone = Backbone(name, norm, freeze_stages)
    if weights is not None:
        backbone.load_pretrained(weights)
    return backbone
