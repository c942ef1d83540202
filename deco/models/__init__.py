"""The DECO detector: backbone, ConvNeXt encoder, SIM/CIM decoder, heads, post-processing, checkpoint conversion."""

from deco.models.convert import convert_official_checkpoint, convert_official_state_dict, infer_official_config
from deco.models.deco import DECO, build_deco
from deco.models.postprocess import PostProcess, postprocess

__all__ = [
    "DECO",
    "PostProcess",
    "build_deco",
    "convert_official_checkpoint",
    "convert_official_state_dict",
    "infer_official_config",
    "postprocess",
]
