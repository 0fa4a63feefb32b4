"""Models by name: the server and every site build the same model from the run config."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedmm.errors import ConfigError
from fedmm.models.fusion import ConcatFusionNet

__all__ = ["register_model", "build_model", "model_names"]

ModelBuilder = Callable[[], nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a zero-argument model builder under ``name``; a duplicate name raises."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered; pick another name")
        _REGISTRY[name] = builder
        return builder

    return decorate


def model_names() -> tuple[str, ...]:
    """Return the registered model names."""
    return tuple(sorted(_REGISTRY))


def build_model(name: str, *, seed: int = 0) -> nn.Module:
    """Build the named model with weights drawn from ``seed`` (same seed, same weights).

    >>> sum(p.numel() for p in build_model("avmnist-concat").parameters()) > 0
    True
    """
    builder = _REGISTRY.get(name)
    if builder is None:
        raise ConfigError("model", "unknown model", value=name, fix=f"use one of: {', '.join(model_names())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder()


@register_model("avmnist-concat")
def _avmnist_concat() -> nn.Module:
    return ConcatFusionNet(num_classes=10)
