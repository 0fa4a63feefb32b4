"""Models: per-modality encoders, fusion, heads, and a registry by name.

Every model here passes Opacus' ``ModuleValidator`` as it is.
"""

from fedmm.models.encoders import PooledSpectrogramEncoder, ScatteringImageEncoder
from fedmm.models.fusion import ConcatFusionNet
from fedmm.models.registry import ModelSpec, build_model, default_learning_rate, encoder_for, layout_fingerprint, model_card, model_names, prepare_inputs, register_model, resolve_model

__all__ = [
    "ScatteringImageEncoder",
    "PooledSpectrogramEncoder",
    "ConcatFusionNet",
    "ModelSpec",
    "build_model",
    "model_names",
    "prepare_inputs",
    "register_model",
    "resolve_model",
    "encoder_for",
    "default_learning_rate",
    "layout_fingerprint",
    "model_card",
]
