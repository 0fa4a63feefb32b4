"""Models: per-modality encoders, fusion, heads, and a registry by name.

Every model here passes Opacus' ``ModuleValidator`` as it is.
"""

from fedmm.models.encoders import ImageEncoder, SpectrogramEncoder
from fedmm.models.fusion import ConcatFusionNet
from fedmm.models.registry import build_model, model_names, register_model

__all__ = [
    "ImageEncoder",
    "SpectrogramEncoder",
    "ConcatFusionNet",
    "build_model",
    "model_names",
    "register_model",
]
