"""Models by name: the server and every site build the same model from the data's schema.

A registered model has a builder (from the prepared schema; weights drawn from a
seed), an optional ``prepare`` step (fixed, per-sample input features it expects,
such as scattering coefficients of the image, computed once when a split is
loaded), and a check of the schemas it accepts.

- ``concat`` works on any schema: one encoder per modality kind (CNN for pixels,
  pooled linear for spectrograms, hashed-token embeddings for text, 1-D CNN for
  sensors, linear for tabular), masked concatenation, linear head;
- ``avmnist-concat`` is the tuned AV-MNIST model (scattering image features).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmm.data.features import scattering_2d
from fedmm.data.schema import Modality, ModalityKind, MultimodalDataset, Schema
from fedmm.errors import ConfigError
from fedmm.models.encoders import (
    ConvImageEncoder,
    HashedTextEncoder,
    PooledSpectrogramEncoder,
    ScatteringImageEncoder,
    SensorEncoder,
    TabularEncoder,
)
from fedmm.models.fusion import AttentionFusionNet, ConcatFusionNet, GatedFusionNet, LateFusionNet

__all__ = [
    "ModelSpec", "register_model", "build_model", "prepare_inputs", "model_names", "resolve_model", "encoder_for",
    "default_learning_rate", "layout_fingerprint", "model_card",
]


def _identity(ds: MultimodalDataset) -> MultimodalDataset:
    return ds


def _any_schema(schema: Schema) -> str | None:
    return None


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model from a (prepared) schema, and the fixed input features it trains on."""

    build: Callable[[Schema], nn.Module]
    prepare: Callable[[MultimodalDataset], MultimodalDataset] = _identity
    check: Callable[[Schema], str | None] = _any_schema  # a problem with the raw schema, or None
    learning_rate: float = 0.1  # what learning-rate="auto" means for this model (plain SGD)


_REGISTRY: dict[str, ModelSpec] = {}
_PREPARED: dict[tuple[str, int], tuple[MultimodalDataset, MultimodalDataset]] = {}


def register_model(name: str, spec: ModelSpec) -> None:
    """Register ``spec`` under ``name``; a duplicate name raises."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered; pick another name")
    _REGISTRY[name] = spec


def model_names() -> tuple[str, ...]:
    """Return the registered model names."""
    return tuple(sorted(_REGISTRY))


def resolve_model(name: str, data: str) -> str:
    """``auto`` picks ``avmnist-concat`` for AV-MNIST and ``concat`` for anything else.

    >>> resolve_model("auto", "avmnist"), resolve_model("auto", "manifest:x.csv")
    ('avmnist-concat', 'concat')
    """
    if name == "auto":
        return "avmnist-concat" if data.partition(":")[0] == "avmnist" else "concat"
    _spec(name)
    return name


def default_learning_rate(name: str) -> float:
    """The SGD learning rate a model was tuned with (what ``learning-rate = "auto"`` uses).

    >>> default_learning_rate("avmnist-concat"), default_learning_rate("concat")
    (0.5, 0.2)
    """
    return _spec(name).learning_rate


def layout_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a state_dict's layout (names, shapes, dtypes, in order), not its values.

    Sites send it with each update; the server refuses an update whose layout differs
    from its own model's, rather than averaging mismatched tensors.

    >>> layout_fingerprint({"w": torch.zeros(2, 3)}) == layout_fingerprint({"w": torch.ones(2, 3)})
    True
    >>> layout_fingerprint({"w": torch.zeros(2, 3)}) == layout_fingerprint({"w": torch.zeros(3, 2)})
    False
    """
    text = "\n".join(f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in state_dict.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_card(name: str, model: nn.Module, schema: Schema) -> dict[str, object]:
    """What a run trained: parameters per modality encoder and per head, the layers that
    are Opacus' DP replacements (for example DPMultiheadAttention for nn.MultiheadAttention),
    the input schema and the layout fingerprint.

    >>> from fedmm.data.synthetic import make_synthetic
    >>> schema = make_synthetic(10).schema
    >>> card = model_card("attention", build_model("attention", schema), schema)
    >>> card["dp_replacements"], sorted(card["encoders"])[:2]
    (['attention: DPMultiheadAttention'], ['audio', 'image'])
    """
    encoders: dict[str, int] = {}
    heads: dict[str, int] = {}
    for child_name, child in model.named_children():
        count = sum(p.numel() for p in child.parameters())
        if child_name == "encoders" and isinstance(child, nn.ModuleList):
            for m, encoder in zip(schema.modalities, child):
                encoders[m.name] = sum(p.numel() for p in encoder.parameters())
        else:
            heads[child_name] = count
    replaced = [
        f"{module_name}: {type(module).__name__}" for module_name, module in model.named_modules()
        if type(module).__module__.startswith("opacus.layers")
    ]
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "encoders": encoders,
        "fusion_and_heads": heads,
        "dp_replacements": replaced,
        "layout_fingerprint": layout_fingerprint(model.state_dict()),
        "schema": json.loads(schema.to_json()),
    }


def _spec(name: str) -> ModelSpec:
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError("model", "unknown model", value=name, fix=f"use auto or one of: {', '.join(model_names())}")
    return spec


def build_model(name: str, schema: Schema, *, seed: int = 0) -> nn.Module:
    """Build the named model for a *prepared* schema with weights drawn from ``seed``.

    >>> from fedmm.data.avmnist import SCHEMA
    >>> schema = prepare_inputs("avmnist-concat", _empty(SCHEMA)).schema
    >>> sum(p.numel() for p in build_model("avmnist-concat", schema).parameters())
    64478
    """
    spec = _spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(schema)


def prepare_inputs(name: str, ds: MultimodalDataset) -> MultimodalDataset:
    """The split as the named model consumes it (cached for the split's lifetime).

    Raises
    ------
    ConfigError
        When the model cannot take this data's modalities.
    """
    spec = _spec(name)
    problem = spec.check(ds.schema)
    if problem:
        raise ConfigError("model", f"cannot train on this data: {problem}", value=name, fix="use model='concat' (any modalities) or model='auto'")
    key = (name, id(ds))
    cached = _PREPARED.get(key)
    if cached is None or cached[0] is not ds:
        cached = (ds, spec.prepare(ds))
        _PREPARED[key] = cached
        while len(_PREPARED) > 8:  # bounded: a long-lived process must not keep every split
            del _PREPARED[next(iter(_PREPARED))]
    return cached[1]


def _empty(schema: Schema) -> MultimodalDataset:
    return MultimodalDataset(
        schema, {m.name: np.zeros((0, *m.shape), m.dtype) for m in schema.modalities},
        np.zeros((0, len(schema.modalities)), bool), np.zeros(0, np.int64),
    )


# ------------------------------------------------------------------ concat (any schema)
def encoder_for(m: Modality, width: int = 64) -> nn.Module:
    """The default encoder of a modality, by its kind and representation."""
    if m.representation == "pixels":
        return ConvImageEncoder(channels=m.shape[0], out_features=width)
    if m.representation == "scattering":
        return ScatteringImageEncoder(channels=m.shape[0], groups=m.shape[0] // 3, out_features=width)
    if m.kind is ModalityKind.AUDIO:
        return PooledSpectrogramEncoder(pool=(min(16, m.shape[1]), min(16, m.shape[2])), out_features=width)
    if m.kind is ModalityKind.TEXT and m.representation == "tokens":
        return HashedTextEncoder(buckets=m.vocab, out_features=width)
    if m.representation == "embedding":  # frozen pretrained embeddings: a linear projection
        return TabularEncoder(width=m.shape[0], out_features=width)
    if m.kind is ModalityKind.SENSOR:
        return SensorEncoder(channels=m.shape[0], out_features=width)
    return TabularEncoder(width=m.shape[0], out_features=width)


register_model(
    "concat",
    # 0.2: tuned on BasicMotions and the manifest example (0.5 diverges with the CNN encoders)
    ModelSpec(build=lambda schema: ConcatFusionNet([encoder_for(m) for m in schema.modalities], schema.num_classes), learning_rate=0.2),
)


for _name, _net in (("gated", GatedFusionNet), ("late", LateFusionNet), ("attention", AttentionFusionNet)):
    register_model(
        _name,
        ModelSpec(build=lambda schema, net=_net: net([encoder_for(m) for m in schema.modalities], schema.num_classes), learning_rate=0.2),  # type: ignore[misc]
    )


# ------------------------------------------------------------------ avmnist-concat
def _scattering_image(ds: MultimodalDataset) -> MultimodalDataset:
    coeffs = scattering_2d(ds.features["image"], J=2)
    image = ds.schema.modality("image")
    mods = tuple(
        Modality(m.name, m.kind, tuple(coeffs.shape[1:]), "scattering") if m is image else m for m in ds.schema.modalities
    )
    return ds.replace(schema=Schema(mods, ds.schema.classes), features={**ds.features, "image": coeffs})


def _avmnist_only(schema: Schema) -> str | None:
    from fedmm.data.avmnist import SCHEMA

    if schema != SCHEMA:
        return f"avmnist-concat takes AV-MNIST's image 1x28x28 and 32-mel audio, not {', '.join(f'{m.name} {m.shape}' for m in schema.modalities)}"
    return None


register_model(
    "avmnist-concat",
    ModelSpec(
        build=lambda schema: ConcatFusionNet(
            [ScatteringImageEncoder(out_features=64), PooledSpectrogramEncoder(out_features=64)], schema.num_classes
        ),
        prepare=_scattering_image,
        check=_avmnist_only,
        learning_rate=0.5,  # tuned on AV-MNIST under DP (issue 2)
    ),
)
