"""Convert the released DECO checkpoints (the authors' key layout) to this project's model.

Released layout (spec, "Checkpoint layout") -> ours:

============================================================================  ==========================================
``backbone.0.body.<torchvision name>`` (ResNet-18/50)                          ``backbone.body.<torchvision name>``
``backbone.0.body.downsample_layers.0.{0,1}.*`` (ConvNeXt-T stem)              ``backbone.body.stem.{0,1}.*``
``backbone.0.body.downsample_layers.S.{0,1}.*`` (S = 1..3)                     ``backbone.body.stages.S.downsample.{0,1}.*``
``backbone.0.body.stages.S.B.{dwconv,norm,pwconv1,pwconv2}.*``                 ``backbone.body.stages.S.blocks.B.{conv_dw,norm,mlp.fc1,mlp.fc2}.*``
``backbone.0.body.stages.S.B.gamma``                                           ``backbone.body.stages.S.blocks.B.gamma``
``input_proj.*``                                                               ``input_proj.*``
``query_embed.weight``                                                         ``decoder.query_pos.weight``
``deco_convnet.tgt.weight``                                                    ``decoder.tgt.weight``
``deco_convnet.encoder._encoder.stages.S.B.{dwconv,norm}.*``                   ``encoder.stages.S.B.{dwconv,norm}.*``
``deco_convnet.encoder._encoder.stages.S.B.{pwconv1,pwconv2,gamma}``           ``encoder.stages.S.B.ffn.{fc1,fc2,gamma}``
``deco_convnet.encoder._encoder.downsample_layers.S.{0,1}.*``                  ``encoder.transitions.S.{norm,proj}.*``
``deco_convnet.encoder._encoder.norm.*`` (defined, never applied)              ``encoder.norm.*``
``deco_convnet.decoder.layers.L.{dwconv1,norm1}``                              ``decoder.layers.L.sim.{dwconv,norm}``
``deco_convnet.decoder.layers.L.{pwconv1_1,pwconv1_2,gamma1}``                 ``decoder.layers.L.sim.ffn.{fc1,fc2,gamma}``
``deco_convnet.decoder.layers.L.{dwconv2,norm2}``                              ``decoder.layers.L.cim.{dwconv,norm}``
``deco_convnet.decoder.layers.L.{pwconv2_1,pwconv2_2,gamma2}``                 ``decoder.layers.L.cim.ffn.{fc1,fc2,gamma}``
``deco_convnet.decoder.norm.*``                                                ``decoder.norm.*``
``class_embed.L.*``, ``bbox_embed.L.layers.I.*``                               ``heads.class_embed.L.*``, ``heads.bbox_embed.L.layers.I.*``
``deco_convnet.decoder.bbox_embed.L.*`` (a second registration of the box      dropped after checking equality
heads)
============================================================================  ==========================================

The released ConvNeXt-T (``deco_convnextTiny1K_150.pth``) is facebookresearch/ConvNeXt's model without its final
LayerNorm and classifier, so its backbone keys are that repository's names; ours are timm's
(:func:`deco.models.backbone.convnext_timm_name`). Everything after the backbone has the same layout for all
three backbones; only ``input_proj.weight``'s input width differs (512, 2048, 768).

A converted file holds ``{"model": state_dict, "model_config": build_deco keyword arguments, "categories":
[{"id", "name"} per class slot]}``, the inference checkpoint format of :mod:`deco.evaluation`. The release
follows DETR: class slot ``i`` is COCO category id ``i`` (91 slots, 0 and the ten ids COCO 2017 leaves unused
named "N/A").
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
from collections.abc import Mapping

import torch

from deco.models.backbone import CONVNEXT_TINY_DEPTHS, CONVNEXT_TINY_DIMS, convnext_timm_name
from deco.models.deco import build_deco

_BACKBONE = "backbone.0.body."
_ENCODER = r"deco_convnet\.encoder\._encoder\."
_DECODER_LAYER = r"deco_convnet\.decoder\.layers\.(\d+)\."
_PARAM = r"(weight|bias)"

_DECODER_LAYER_PARTS = {
    "dwconv1": "sim.dwconv",
    "norm1": "sim.norm",
    "pwconv1_1": "sim.ffn.fc1",
    "pwconv1_2": "sim.ffn.fc2",
    "dwconv2": "cim.dwconv",
    "norm2": "cim.norm",
    "pwconv2_1": "cim.ffn.fc1",
    "pwconv2_2": "cim.ffn.fc2",
}

# (released-key pattern, our key template) for everything after the backbone; every such released key must match
# exactly one pattern. Backbone keys are renamed by _rename, which knows the backbone.
_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(pattern), template)
    for pattern, template in [
        (rf"input_proj\.{_PARAM}", r"input_proj.\1"),
        (r"query_embed\.weight", "decoder.query_pos.weight"),
        (r"deco_convnet\.tgt\.weight", "decoder.tgt.weight"),
        (rf"{_ENCODER}stages\.(\d+)\.(\d+)\.(dwconv|norm)\.{_PARAM}", r"encoder.stages.\1.\2.\3.\4"),
        (rf"{_ENCODER}stages\.(\d+)\.(\d+)\.pwconv1\.{_PARAM}", r"encoder.stages.\1.\2.ffn.fc1.\3"),
        (rf"{_ENCODER}stages\.(\d+)\.(\d+)\.pwconv2\.{_PARAM}", r"encoder.stages.\1.\2.ffn.fc2.\3"),
        (rf"{_ENCODER}stages\.(\d+)\.(\d+)\.gamma", r"encoder.stages.\1.\2.ffn.gamma"),
        (rf"{_ENCODER}downsample_layers\.(\d+)\.0\.{_PARAM}", r"encoder.transitions.\1.norm.\2"),
        (rf"{_ENCODER}downsample_layers\.(\d+)\.1\.{_PARAM}", r"encoder.transitions.\1.proj.\2"),
        (rf"{_ENCODER}norm\.{_PARAM}", r"encoder.norm.\1"),
        *[
            (rf"{_DECODER_LAYER}{released}\.{_PARAM}", rf"decoder.layers.\1.{ours}.\2")
            for released, ours in _DECODER_LAYER_PARTS.items()
        ],
        (rf"{_DECODER_LAYER}gamma1", r"decoder.layers.\1.sim.ffn.gamma"),
        (rf"{_DECODER_LAYER}gamma2", r"decoder.layers.\1.cim.ffn.gamma"),
        (rf"deco_convnet\.decoder\.norm\.{_PARAM}", r"decoder.norm.\1"),
        (rf"class_embed\.(\d+)\.{_PARAM}", r"heads.class_embed.\1.\2"),
        (rf"bbox_embed\.(\d+)\.layers\.(\d+)\.{_PARAM}", r"heads.bbox_embed.\1.layers.\2.\3"),
    ]
]
# COCO 2017 category ids and names (the ids are not contiguous).
COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich",
    55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair",
    63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop",
    74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster",
    81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}


def released_categories(num_classes: int) -> list[dict]:
    """``{"id", "name"}`` per class slot of a released model: slot ``i`` is category id ``i``; with 91 slots
    (COCO) the names are COCO's ("N/A" for unused ids), otherwise "class i"."""
    if num_classes == 91:
        return [{"id": i, "name": COCO_CATEGORY_NAMES.get(i, "N/A")} for i in range(num_classes)]
    return [{"id": i, "name": f"class {i}"} for i in range(num_classes)]


_DUPLICATE_BOX_HEAD = re.compile(r"deco_convnet\.decoder\.(bbox_embed\..+)")


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"released state dict: missing key {key!r}")
    return state_dict[key]


def _indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    found = {int(m.group(1)) for key in state_dict if (m := re.fullmatch(pattern, key))}
    return sorted(found)


def _infer_backbone(state_dict: Mapping[str, torch.Tensor]) -> str:
    """"resnet50", "resnet18" or "convnext_tiny", from the released backbone keys (``backbone.0.body.*``)."""
    if f"{_BACKBONE}layer4.0.conv3.weight" in state_dict:
        return "resnet50"
    if f"{_BACKBONE}layer4.0.conv2.weight" in state_dict:
        return "resnet18"
    if f"{_BACKBONE}downsample_layers.0.0.weight" in state_dict:
        stages = _indices(state_dict, r"backbone\.0\.body\.stages\.(\d+)\..+")
        depths = tuple(len(_indices(state_dict, rf"backbone\.0\.body\.stages\.{s}\.(\d+)\..+")) for s in stages)
        dims = tuple(_require(state_dict, f"{_BACKBONE}stages.{s}.0.dwconv.weight").shape[0] for s in stages)
        if depths != CONVNEXT_TINY_DEPTHS or dims != CONVNEXT_TINY_DIMS:
            raise ValueError(
                f"released state dict: the backbone is a ConvNeXt with depths {depths} and widths {dims}; only "
                f"ConvNeXt-T (depths {CONVNEXT_TINY_DEPTHS}, widths {CONVNEXT_TINY_DIMS}) is supported"
            )
        return "convnext_tiny"
    backbone_keys = sorted(key for key in state_dict if key.startswith(_BACKBONE))
    modules = sorted({key[len(_BACKBONE):].split(".")[0] for key in backbone_keys})
    found = (
        f"found {len(backbone_keys)} backbone keys under {_BACKBONE}{{{', '.join(modules)}}} "
        f"(first: {backbone_keys[0]!r})"
        if backbone_keys
        else f"found no {_BACKBONE}* keys"
    )
    raise ValueError(
        "released state dict: cannot tell the backbone; its keys fit neither ResNet-18/50 "
        f"({_BACKBONE}layer4.0.conv2/conv3.weight) nor ConvNeXt-T ({_BACKBONE}downsample_layers.0.0.weight): {found}"
    )


def infer_official_config(state_dict: Mapping[str, torch.Tensor], query_grid: tuple[int, int] | None = None) -> dict:
    """The :func:`build_deco` arguments of a released state dict (backbone, classes, queries, widths, depths).

    The query grid is not stored in a checkpoint: None means the release's 10 rows (``qH = 10``).
    """
    backbone = _infer_backbone(state_dict)
    num_queries = _require(state_dict, "query_embed.weight").shape[0]
    d_model = _require(state_dict, "deco_convnet.decoder.norm.weight").shape[0]
    stages = _indices(state_dict, _ENCODER + r"stages\.(\d+)\..+")
    encoder_dims = [_require(state_dict, f"deco_convnet.encoder._encoder.stages.{s}.0.dwconv.weight").shape[0] for s in stages]
    encoder_depths = [len(_indices(state_dict, _ENCODER + rf"stages\.{s}\.(\d+)\..+")) for s in stages]
    num_layers = len(_indices(state_dict, _DECODER_LAYER + ".+"))
    ffn_hidden = _require(state_dict, "deco_convnet.decoder.layers.0.pwconv1_1.weight").shape[0]
    if query_grid is None:
        if num_queries % 10:
            raise ValueError(f"query_grid must be given: {num_queries} queries do not fill rows of 10")
        query_grid = (10, num_queries // 10)
    return {
        "backbone": backbone,
        "num_classes": _require(state_dict, "class_embed.0.weight").shape[0],
        "num_queries": num_queries,
        "query_grid": tuple(query_grid),
        "d_model": d_model,
        "encoder_dims": tuple(encoder_dims),
        "encoder_depths": tuple(encoder_depths),
        "num_decoder_layers": num_layers,
        "ffn_ratio": ffn_hidden // d_model,
    }


def _rename(key: str, backbone: str) -> str:
    if key.startswith(_BACKBONE):
        name = key[len(_BACKBONE):]
        # ResNet: torchvision's names on both sides; ConvNeXt: facebookresearch/ConvNeXt's names -> timm's.
        return "backbone.body." + (name if backbone.startswith("resnet") else convnext_timm_name(name))
    for pattern, template in _RULES:
        if pattern.fullmatch(key):
            return pattern.sub(template, key)
    raise KeyError(key)


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], query_grid: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Released state dict (the ``"model"`` entry of a released file) -> a state dict for :func:`build_deco`.

    The duplicated box heads (``deco_convnet.decoder.bbox_embed.*``) are checked equal to ``bbox_embed.*`` and
    dropped. The result is checked against the architecture :func:`infer_official_config` finds (built on the
    meta device, so nothing is allocated): a ValueError names unknown, missing and wrongly shaped keys.
    """
    config = infer_official_config(state_dict, query_grid)
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        duplicate = _DUPLICATE_BOX_HEAD.fullmatch(key)
        if duplicate:
            original = duplicate.group(1)
            if original not in state_dict:
                raise ValueError(f"released state dict: {key!r} has no {original!r} to duplicate")
            if state_dict[original].shape != tensor.shape or not torch.equal(state_dict[original], tensor):
                raise ValueError(f"released state dict: {key!r} differs from {original!r}; they must be equal")
            continue
        try:
            converted[_rename(key, config["backbone"])] = tensor
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"released state dict: unknown keys {unknown}")
    with torch.device("meta"):
        expected = build_deco(**config).state_dict()
    missing = [key for key in expected if key not in converted]
    unexpected = [key for key in converted if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"released state dict does not match DECO-{config['backbone']}: missing (our names) {missing}, "
            f"unexpected (our names) {unexpected}"
        )
    for key, tensor in expected.items():
        if converted[key].shape != tensor.shape:
            raise ValueError(
                f"released state dict: shape mismatch for {key!r}: {tuple(converted[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    return {key: converted[key] for key in expected}


def convert_official_checkpoint(
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    query_grid: tuple[int, int] | None = None,
    trust_pickle: bool = False,
) -> dict:
    """Read a released checkpoint (state dict under ``"model"``), convert it, write
    ``{"model", "model_config", "categories"}`` (see the module docstring).

    The source is read with ``torch.load(weights_only=True)`` (tensors, containers and the ``argparse.Namespace``
    of training arguments that DETR-style checkpoints carry); ``trust_pickle=True`` allows any pickled object,
    only for files from a trusted source. The file is written to a temporary file beside ``dst_path`` and
    moved into place with ``os.replace``, so a failed or interrupted conversion never leaves a partial file.
    Returns the model config (``build_deco`` kwargs).
    """
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path)
    if not os.path.isfile(src_path):
        raise FileNotFoundError(f"no such checkpoint: {src_path!r}")
    if trust_pickle:
        checkpoint = torch.load(src_path, map_location="cpu", weights_only=False)
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(src_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{src_path!r} holds Python objects that weights-only loading refuses ({error}); if the file comes "
                "from a trusted source, convert with trust_pickle=True (CLI: --trust-pickle)"
            ) from error
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"{src_path!r}: expected a released checkpoint with a 'model' entry; found {found}")
    state_dict = convert_official_state_dict(checkpoint["model"], query_grid)
    config = infer_official_config(checkpoint["model"], query_grid)
    directory = os.path.dirname(os.path.abspath(dst_path))
    handle, temp_path = tempfile.mkstemp(prefix=".convert-", suffix=".pth", dir=directory)
    os.close(handle)
    try:
        torch.save(
            {"model": state_dict, "model_config": config, "categories": released_categories(config["num_classes"])},
            temp_path,
        )
        os.replace(temp_path, dst_path)
    except BaseException:
        os.unlink(temp_path)
        raise
    return config
