"""Models by name: the server and every site build the same model from the run config.

A registered model has a builder (weights drawn from a seed) and a ``prepare``
step: the fixed, per-sample input features it expects (for example scattering
coefficients of the image), computed once when a split is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedmm.data.avmnist import MultimodalArrays
from fedmm.data.features import scattering_2d
from fedmm.errors import ConfigError
from fedmm.models.encoders import PooledSpectrogramEncoder, ScatteringImageEncoder
from fedmm.models.fusion import ConcatFusionNet

__all__ = ["ModelSpec", "register_model", "build_model", "prepare_inputs", "model_names"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and the fixed input features it trains on."""

    build: Callable[[], nn.Module]
    prepare: Callable[[MultimodalArrays], MultimodalArrays]


_REGISTRY: dict[str, ModelSpec] = {}
_PREPARED: dict[tuple[str, int], tuple[MultimodalArrays, MultimodalArrays]] = {}


def register_model(name: str, spec: ModelSpec) -> None:
    """Register ``spec`` under ``name``; a duplicate name raises."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered; pick another name")
    _REGISTRY[name] = spec


def model_names() -> tuple[str, ...]:
    """Return the registered model names."""
    return tuple(sorted(_REGISTRY))


def _spec(name: str) -> ModelSpec:
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError("model", "unknown model", value=name, fix=f"use one of: {', '.join(model_names())}")
    return spec


def build_model(name: str, *, seed: int = 0) -> nn.Module:
    """Build the named model with weights drawn from ``seed`` (same seed, same weights).

    >>> sum(p.numel() for p in build_model("avmnist-concat").parameters())
    64458
    """
    spec = _spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build()


def prepare_inputs(name: str, arrays: MultimodalArrays) -> MultimodalArrays:
    """The split as the named model consumes it (cached for the split's lifetime)."""
    key = (name, id(arrays))
    cached = _PREPARED.get(key)
    if cached is None or cached[0] is not arrays:
        cached = (arrays, _spec(name).prepare(arrays))
        _PREPARED[key] = cached
    return cached[1]


def _scattering_image(arrays: MultimodalArrays) -> MultimodalArrays:
    return dataclasses.replace(arrays, image=scattering_2d(arrays.image, J=2))


register_model(
    "avmnist-concat",
    ModelSpec(
        build=lambda: ConcatFusionNet(
            image_encoder=ScatteringImageEncoder(out_features=64),
            audio_encoder=PooledSpectrogramEncoder(out_features=64),
            num_classes=10,
        ),
        prepare=_scattering_image,
    ),
)
