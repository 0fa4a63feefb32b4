"""Fusion models by name, and the encoder of each modality.

A registered fusion is a :class:`ModelSpec`: a builder that takes the modality
encoders (built by :func:`encoder_for` from the schema and the model options) and
the output width, and returns a :class:`fedmm.models.fusion.FusionNet`. Register
your own with :func:`register_model`; it can then be chosen with ``model='NAME'``.

- ``concat``: early fusion, masked concatenation of the embeddings and the mask;
- ``gated``: a learned, input-dependent weight per modality;
- ``attention``: cross-modal self-attention (Opacus' DP attention layers), absent
  modalities masked as keys;
- ``late``: one classifier per modality, logits averaged over the present ones;
- ``embedding``: a hidden layer over frozen pretrained embeddings
  (``text-features='minilm'``, ``image-encoder='pretrained'``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedmm.data.schema import STATS_SERIES, Modality, ModalityKind, Schema
from fedmm.errors import ConfigError
from fedmm.models.encoders import (
    ConvImageEncoder,
    HashedTextEncoder,
    PooledSpectrogramEncoder,
    ScatteringImageEncoder,
    SensorEncoder,
    TabularEncoder,
)
from fedmm.models.options import ModelOptions
from fedmm.models.fusion import AttentionFusionNet, ConcatFusionNet, EmbeddingFusionNet, FusionNet, GatedFusionNet, LateFusionNet


__all__ = ["ModelSpec", "register_model", "model_names", "model_spec", "encoder_for", "is_pretrained", "layout_fingerprint", "model_card"]


def _any_schema(schema: Schema) -> str | None:
    return None


@dataclass(frozen=True)
class ModelSpec:
    """How to build a fusion model around the encoders, and what it accepts."""

    build: Callable[[list[nn.Module], int, int], FusionNet]  # (encoders, outputs, projection width)
    check: Callable[[Schema], str | None] = _any_schema  # a problem with the prepared schema, or None
    # what learning-rate="auto" means (plain SGD): with only linear encoders over fixed
    # features (scattering, pooled spectrograms, embeddings) and with deeper encoders
    learning_rate: float = 0.5
    deep_learning_rate: float = 0.2
    # without DP's noise linear encoders swing at 0.5: SGD with momentum instead (docs/training.md)
    plain_learning_rate: float = 0.1
    plain_momentum: float = 0.9


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, spec: ModelSpec) -> None:
    """Register ``spec`` under ``name``; a duplicate name raises."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered; pick another name")
    _REGISTRY[name] = spec


def model_names() -> tuple[str, ...]:
    """Return the registered model (fusion) names."""
    return tuple(sorted(_REGISTRY))


def model_spec(name: str) -> ModelSpec:
    """The registered spec of ``name``, or a ConfigError naming the choices."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError("model", "unknown model", value=name, fix=f"use auto or one of: {', '.join(model_names())}")
    return spec


def is_pretrained(m: Modality) -> bool:
    """Features from a frozen pretrained encoder (sentence embeddings, a pretrained image CNN)."""
    return m.representation == "embedding" or m.representation.startswith("pretrained")


def encoder_for(m: Modality, options: ModelOptions | None = None) -> nn.Module:
    """The encoder of a (prepared) modality, by its kind, representation and the options."""
    options = options or ModelOptions()
    width = options.width
    if is_pretrained(m):  # frozen upstream: a trainable projection
        return TabularEncoder(width=m.shape[0], out_features=width)
    if m.representation == "pixels":
        return ConvImageEncoder(channels=m.shape[0], out_features=width)
    if m.representation == "scattering":
        return ScatteringImageEncoder(channels=m.shape[0], groups=m.shape[0] // 3, out_features=width)
    if m.kind is ModalityKind.AUDIO:
        if options.audio_encoder == "cnn":
            return ConvImageEncoder(channels=m.shape[0], out_features=width)
        return PooledSpectrogramEncoder(pool=(min(16, m.shape[1]), min(16, m.shape[2])), out_features=width)
    if m.kind is ModalityKind.TEXT and m.representation == "tokens":
        from fedmm.models.sequence import TextGRUEncoder, TextTransformerEncoder

        if options.text_encoder == "gru":
            return TextGRUEncoder(buckets=m.vocab, out_features=width)
        if options.text_encoder == "transformer":
            return TextTransformerEncoder(buckets=m.vocab, length=m.shape[0], out_features=width)
        return HashedTextEncoder(buckets=m.vocab, out_features=width)
    if m.kind is ModalityKind.SENSOR:
        # window-stats series: C shape channels, then 2C statistics (fedmm.data.normalise)
        channels = m.shape[0] // 3 if m.representation == STATS_SERIES else m.shape[0]
        stats = m.shape[0] - channels
        if options.sensor_encoder == "gru":
            from fedmm.models.sequence import SensorGRUEncoder

            return SensorGRUEncoder(channels=channels, out_features=width, stats=stats)
        return SensorEncoder(channels=channels, out_features=width, stats=stats)
    return TabularEncoder(width=m.shape[0], out_features=width)


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


def model_card(name: str, model: nn.Module, schema: Schema, options: ModelOptions | None = None) -> dict[str, object]:
    """What a run trained: parameters per modality encoder (and its class) and per fusion
    part and head, the layers that are Opacus' DP replacements (for example
    DPMultiheadAttention for nn.MultiheadAttention), the tasks, the input schema and the
    layout fingerprint.

    >>> from fedmm.data.synthetic import make_synthetic
    >>> from fedmm.models.recipe import ModelRecipe
    >>> recipe = ModelRecipe("attention")
    >>> schema = recipe.prepare(make_synthetic(10)).schema
    >>> card = model_card("attention", recipe.build(schema), schema)
    >>> card["dp_replacements"], sorted(card["encoders"])[:2]
    (['attention: DPSelfAttention (on opacus DPMultiheadAttention)'], ['audio', 'image'])
    """
    encoders: dict[str, dict[str, object]] = {}
    heads: dict[str, int] = {}
    for child_name, child in model.named_children():
        count = sum(p.numel() for p in child.parameters())
        if child_name == "encoders" and isinstance(child, nn.ModuleList):
            for m, encoder in zip(schema.modalities, child):
                encoders[m.name] = {
                    "encoder": type(encoder).__name__, "representation": m.representation,
                    "parameters": sum(p.numel() for p in encoder.parameters()), "out_features": int(encoder.out_features),  # type: ignore[arg-type]
                }
        else:
            heads[child_name] = count
    replaced: list[str] = []
    for module_name, module in model.named_modules():
        base = next((c for c in type(module).__mro__ if c.__module__.startswith("opacus.layers")), None)
        if base is None or any(module_name.startswith(r.split(":")[0] + ".") for r in replaced):
            continue  # not a DP layer, or inside one already listed
        own = type(module).__name__
        replaced.append(f"{module_name}: {own}" + (f" (on opacus {base.__name__})" if base is not type(module) else ""))
    layout = getattr(model, "output_layout", None)
    card: dict[str, object] = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "encoders": encoders,
        "fusion_and_heads": heads,
        "dp_replacements": replaced,
        "tasks": [{"name": t, "classes": k, "loss_weight": w} for t, k, w in layout.tasks] if layout is not None else [],
        "layout_fingerprint": layout_fingerprint(model.state_dict()),
        "schema": json.loads(schema.to_json()),
    }
    if options is not None:
        card["options"] = options.describe()
    return card


register_model("concat", ModelSpec(build=lambda enc, k, p: ConcatFusionNet(enc, k, projection=p)))
register_model("gated", ModelSpec(build=lambda enc, k, p: GatedFusionNet(enc, k, projection=p)))
register_model("late", ModelSpec(build=lambda enc, k, p: LateFusionNet(enc, k, projection=p)))
register_model("attention", ModelSpec(build=lambda enc, k, p: AttentionFusionNet(enc, k, projection=p, heads=4)))


def _needs_pretrained(schema: Schema) -> str | None:
    if not any(is_pretrained(m) for m in schema.modalities):
        return (
            "embedding fusion works over frozen pretrained features, and none of "
            f"{', '.join(f'{m.name} ({m.representation})' for m in schema.modalities)} has them; set "
            "text-features='minilm' and/or image-encoder='pretrained' with image-weights=PATH"
        )
    return None


register_model("embedding", ModelSpec(build=lambda enc, k, p: EmbeddingFusionNet(enc, k, projection=p), check=_needs_pretrained))

