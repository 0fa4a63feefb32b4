"""The model a run trains: a fusion by name plus the options that shape it.

:class:`ModelRecipe` is the one place that turns a run's configuration into a
model, so the server and every site build exactly the same one:

- :meth:`ModelRecipe.prepare` turns a loaded split into the model's inputs: it keeps
  the chosen ``modalities``, computes fixed per-sample image features (scattering
  coefficients, or embeddings of a frozen pretrained CNN) and names the auxiliary
  tasks;
- :meth:`ModelRecipe.build` builds the encoders and the fusion, seeded;
- :meth:`ModelRecipe.objective` is the loss (multi-task, contrastive).

>>> from fedmm.data.synthetic import make_synthetic
>>> recipe = ModelRecipe("late", ModelOptions(width=32))
>>> data = recipe.prepare(make_synthetic(8))
>>> recipe.build(data.schema)(*[torch.from_numpy(v) for v in data.features.values()], torch.ones(8, 5)).shape
torch.Size([8, 10])
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedmm.data.features import scattering_2d
from fedmm.data.schema import Modality, ModalityKind, MultimodalDataset, Schema
from fedmm.errors import ConfigError
from fedmm.models.encoders import ConvImageEncoder
from fedmm.models.fusion import FusionNet
from fedmm.models.objective import Objective, OutputLayout
from fedmm.models.options import ModelOptions
from fedmm.models.registry import encoder_for, model_card, model_spec

if TYPE_CHECKING:
    from fedmm.config import RunConfig

__all__ = ["ModelOptions", "ModelRecipe", "pretrained_image_features", "save_image_encoder"]

PROJECTION = 32  # width of the per-modality projections the contrastive objective compares
ATTENTION_HEADS = 4
_UNKNOWN = frozenset({"", "nan", "None"})  # an empty group cell is an unknown task label, not a class
_ALIASES = {"avmnist-concat": "concat"}  # earlier name of the AV-MNIST default (old run configs replay)


@dataclass(frozen=True)
class ModelRecipe:
    """A fusion (registered name) and its options: everything needed to build the model."""

    fusion: str = "concat"
    options: ModelOptions = ModelOptions()

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ModelRecipe:
        """The run's model; ``model='auto'`` is ``concat``."""
        fusion = "concat" if cfg.model == "auto" else _ALIASES.get(cfg.model, cfg.model)
        return cls(fusion, ModelOptions.from_config(cfg))

    def __post_init__(self) -> None:
        model_spec(self.fusion)
        if self.fusion == "attention" and self.options.width % ATTENTION_HEADS:
            raise ConfigError(
                "encoder-width", f"attention fusion splits the width over {ATTENTION_HEADS} heads", value=self.options.width,
                fix=f"use a multiple of {ATTENTION_HEADS}, e.g. encoder-width=64",
            )

    # ------------------------------------------------------------------ inputs
    def prepare(self, ds: MultimodalDataset, *, tasks_from: Schema | None = None) -> MultimodalDataset:
        """The split as this model consumes it (cached for the split's lifetime).

        ``tasks_from``: the server's schema, whose auxiliary-task classes a site adopts
        (so that a site that lacks a speaker still builds the same heads).

        Raises
        ------
        ConfigError
            When the model cannot take this data (unknown modality or task, no
            pretrained features for embedding fusion).
        """
        key = (self, id(ds), tasks_from.to_json() if tasks_from is not None else None)
        cached = _PREPARED.get(key)
        if cached is not None and cached[0] is ds:
            return cached[1]
        out = self._select(ds)
        out = self._image_features(out)
        out = self._with_tasks(out, tasks_from)
        problem = model_spec(self.fusion).check(out.schema)
        if problem:
            raise ConfigError("model", f"cannot train on this data: {problem}", value=self.fusion, fix="use model='concat' (any modalities) or model='auto'")
        _PREPARED[key] = (ds, out)
        while len(_PREPARED) > 8:  # bounded: a long-lived process must not keep every split
            del _PREPARED[next(iter(_PREPARED))]
        return out

    def _select(self, ds: MultimodalDataset) -> MultimodalDataset:
        if not self.options.modalities:
            return ds
        names = ds.schema.names
        unknown = [m for m in self.options.modalities if m not in names]
        if unknown:
            raise ConfigError("modalities", f"{', '.join(unknown)} not in the data", value=",".join(self.options.modalities), fix=f"choose from {', '.join(names)}")
        keep = [j for j, m in enumerate(ds.schema.modalities) if m.name in self.options.modalities]
        schema = dataclasses.replace(ds.schema, modalities=tuple(ds.schema.modalities[j] for j in keep))
        return ds.replace(schema=schema, features={ds.schema.modalities[j].name: ds.features[ds.schema.modalities[j].name] for j in keep}, present=ds.present[:, keep])

    def _image_features(self, ds: MultimodalDataset) -> MultimodalDataset:
        kind = self.options.image_encoder
        if kind not in ("scattering", "pretrained"):
            return ds
        mods, features = [], dict(ds.features)
        for j, m in enumerate(ds.schema.modalities):
            if m.kind is ModalityKind.IMAGE and m.representation == "pixels":
                if kind == "scattering":
                    if m.shape[0] != 1:
                        raise ConfigError("image-encoder", f"scattering takes one-channel images, {m.name} has {m.shape[0]}", value=kind, fix="set image-mode='L' or image-encoder='cnn'")
                    features[m.name] = scattering_2d(ds.features[m.name], J=2)
                    m = Modality(m.name, m.kind, tuple(features[m.name].shape[1:]), "scattering")
                else:
                    embedded, digest = pretrained_image_features(ds.features[m.name], self.options.image_weights)
                    features[m.name] = embedded * ds.present[:, j : j + 1]  # absent stays all zeros
                    m = Modality(m.name, m.kind, tuple(features[m.name].shape[1:]), f"pretrained:{digest}")
            mods.append(m)
        return ds.replace(schema=dataclasses.replace(ds.schema, modalities=tuple(mods)), features=features)

    def _with_tasks(self, ds: MultimodalDataset, tasks_from: Schema | None) -> MultimodalDataset:
        if not self.options.tasks:
            return ds
        # the server's classes when it sent them, else this split's own (tests, tools)
        named = tasks_from if tasks_from is not None and tasks_from.tasks else self.task_classes(ds)
        return ds.replace(schema=dataclasses.replace(ds.schema, tasks=named.tasks if named is not None else ()))

    def task_classes(self, *datasets: MultimodalDataset) -> Schema | None:
        """A schema naming each auxiliary task's classes: the values of its column in all of
        ``datasets`` (the server's view, sent to every site). None without tasks."""
        if not self.options.tasks:
            return None
        tasks = []
        for name, _ in self.options.tasks:
            values = {str(v) for ds in datasets if name in ds.groups for v in ds.groups[name]} - _UNKNOWN
            if not values:
                raise ConfigError("tasks", f"no column {name!r} to predict", value=name, fix=f"use one of the data's group columns: {', '.join(sorted({g for ds in datasets for g in ds.groups})) or 'none'}")
            tasks.append((name, tuple(sorted(values))))
        return Schema((), (), tuple(tasks))

    # ------------------------------------------------------------------ model
    def layout(self, schema: Schema) -> OutputLayout:
        """The slices of this model's output for ``schema``."""
        weights = dict(self.options.tasks)
        tasks = (("label", schema.num_classes, 1.0), *((name, len(classes), weights.get(name, 1.0)) for name, classes in schema.tasks))
        return OutputLayout(tasks, len(schema.modalities), PROJECTION if self.options.contrastive != "none" else 0)

    def build(self, schema: Schema, *, seed: int = 0) -> FusionNet:
        """The model for a *prepared* schema, weights drawn from ``seed``; ``output_layout`` set."""
        spec = model_spec(self.fusion)
        layout = self.layout(schema)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.build([encoder_for(m, self.options) for m in schema.modalities], layout.logits_width, layout.projection)
        model.output_layout = layout  # type: ignore[assignment]
        return model

    def objective(self, schema: Schema, class_weights: torch.Tensor | None = None) -> Objective:
        """The training loss of this model."""
        return Objective(self.layout(schema), class_weights=class_weights, contrastive=self.options.contrastive, contrastive_weight=self.options.contrastive_weight)

    def learning_rate(self, schema: Schema, *, dp: bool = True) -> float:
        """What ``learning-rate='auto'`` means for this model: the fusion's tuned rate,
        lower when any encoder is deep (convolutions, recurrences, attention); without DP,
        linear encoders take a lower rate with momentum (:meth:`momentum`)."""
        spec = model_spec(self.fusion)
        if _encoder_traits(self, schema)[0]:
            return spec.deep_learning_rate
        return spec.learning_rate if dp else spec.plain_learning_rate

    def momentum(self, schema: Schema, *, dp: bool = True) -> float:
        """What ``momentum='auto'`` means: momentum only without DP and with linear encoders."""
        return 0.0 if dp or _encoder_traits(self, schema)[0] else model_spec(self.fusion).plain_momentum

    def grad_sample_modes(self, schema: Schema) -> frozenset[str]:
        """The Opacus grad-sample modes every encoder of this model trains correctly under."""
        return _encoder_traits(self, schema)[1]

    def check_grad_sample_mode(self, mode: str, schema: Schema) -> None:
        """Raise a ConfigError if an encoder cannot train under ``mode``."""
        supported = self.grad_sample_modes(schema)
        if mode not in supported:
            raise ConfigError(
                "grad-sample-mode", f"the {self.fusion} model with {self.options.text_encoder} text / {self.options.sensor_encoder} sensor encoders "
                f"has no correct per-sample gradients in this mode", value=mode, fix=f"use grad-sample-mode={' or '.join(sorted(supported))}",
            )

    def card(self, model: nn.Module, schema: Schema) -> dict[str, object]:
        """The model card of this model (see :func:`fedmm.models.registry.model_card`)."""
        return model_card(self.fusion, model, schema, self.options)


_PREPARED: dict[tuple[Any, ...], tuple[MultimodalDataset, MultimodalDataset]] = {}


@functools.lru_cache(maxsize=32)
def _encoder_traits(recipe: ModelRecipe, schema: Schema) -> tuple[bool, frozenset[str]]:
    """Whether any encoder is deep (convolutions, recurrences, attention), and the grad-sample
    modes all of them support; built once per recipe and schema, not every round."""
    encoders = [encoder_for(m, recipe.options) for m in schema.modalities]
    deep = any(
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)) or type(module).__name__.startswith("DP")
        for encoder in encoders for module in encoder.modules()
    )
    modes = frozenset(("ghost", "hooks", "functorch"))
    for encoder in encoders:
        modes &= getattr(encoder, "grad_sample_modes", modes)
    return deep, modes


# ------------------------------------------------------------------ pretrained image encoder
def save_image_encoder(encoder: ConvImageEncoder, path: str | Path) -> None:
    """Save a (pretrained) image encoder for ``image-encoder='pretrained'``, ``image-weights=PATH``."""
    torch.save(encoder.state_dict(), path)


@functools.lru_cache(maxsize=2)
def _frozen_image_encoder(path: str) -> tuple[ConvImageEncoder, str]:
    # The path comes from the run config, which a deployed site gets from the server, and an error reaches the
    # server: one message whether the file is missing, unreadable or another file (no existence bit, nor any of
    # the file's bytes, which a decoder's message can quote); the cause goes to this process's own log.
    file = Path(path)
    try:
        blob = file.read_bytes()
        state = torch.load(file, map_location="cpu", weights_only=True)  # weights only: a weights file runs no code
        first, last = state["net.0.weight"], state["net.8.weight"]
        encoder = ConvImageEncoder(channels=int(first.shape[1]), out_features=int(last.shape[0]))
        encoder.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any missing, unreadable or foreign file gets the same clear error
        logging.getLogger(__name__).warning("image-weights %s: %s: %s", path, type(exc).__name__, exc)
        raise ConfigError(
            "image-weights", "is no readable state_dict of fedmm's ConvImageEncoder (missing, unreadable or another file; the cause is in this "
            "process's log)", value=path, fix="give the path of a file saved with fedmm.models.save_image_encoder(encoder, path)",
        ) from None
    encoder.eval().requires_grad_(False)
    return encoder, hashlib.sha256(blob).hexdigest()[:12]


def pretrained_image_features(images: np.ndarray, path: str, *, batch_size: int = 512) -> tuple[np.ndarray, str]:
    """Embeddings ``[N, width]`` of ``[N, C, H, W]`` images by the frozen encoder in ``path``,
    and a digest of the weights (part of the schema, so sites with other weights are refused)."""
    encoder, digest = _frozen_image_encoder(str(Path(path).resolve()))
    channels = encoder.net[0].in_channels  # type: ignore[union-attr]
    if images.shape[1] != channels:
        raise ConfigError("image-weights", f"the encoder takes {channels}-channel images, the data has {images.shape[1]}", value=path, fix="set image-mode to match the encoder")
    width = int(encoder.out_features)
    out = [np.zeros((0, width), np.float32)]
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(encoder(torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))).numpy())
    return np.concatenate(out).astype(np.float32), digest
