"""The options that shape a run's model: encoder choices and sizes, auxiliary tasks, objectives.

>>> ModelOptions(width=32).image_encoder
'cnn'
>>> ModelOptions(audio_encoder="lstm")
Traceback (most recent call last):
...
fedmm.errors.ConfigError: config key 'audio-encoder': must be one of: pooled, cnn (got 'lstm'). Fix: e.g. audio-encoder='pooled'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmm.errors import ConfigError
from fedmm.models.objective import CONTRASTIVE

if TYPE_CHECKING:
    from fedmm.config import RunConfig

__all__ = ["ModelOptions", "IMAGE_ENCODERS", "AUDIO_ENCODERS", "TEXT_ENCODERS", "SENSOR_ENCODERS"]

IMAGE_ENCODERS = ("auto", "cnn", "scattering", "pretrained")
AUDIO_ENCODERS = ("pooled", "cnn")
TEXT_ENCODERS = ("bag", "gru", "transformer")
SENSOR_ENCODERS = ("cnn", "gru")

def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"must be one of: {', '.join(allowed)}", value=value, fix=f"e.g. {key}='{allowed[0]}'")


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """Encoder choices and sizes, auxiliary tasks and objectives (run-config keys in brackets)."""

    width: int = 64  # [encoder-width] every encoder's output width
    image_encoder: str = "cnn"  # [image-encoder] cnn | scattering | pretrained (auto: scattering on AV-MNIST)
    image_weights: str = ""  # [image-weights] pretrained: a state_dict of fedmm's ConvImageEncoder
    audio_encoder: str = "pooled"  # [audio-encoder] pooled (linear over a pooled spectrogram) | cnn
    text_encoder: str = "bag"  # [text-encoder] bag (mean of token embeddings) | gru | transformer
    sensor_encoder: str = "cnn"  # [sensor-encoder] cnn | gru
    modalities: tuple[str, ...] = ()  # [modalities] train on these only; empty: all
    tasks: tuple[tuple[str, float], ...] = ()  # [tasks] auxiliary tasks: (group column, loss weight)
    contrastive: str = "none"  # [contrastive] none | align | clip (dp=false only)
    contrastive_weight: float = 0.1  # [contrastive-weight]
    modality_dropout: float = 0.0  # [modality-dropout] per-sample chance of hiding a present modality in training

    def __post_init__(self) -> None:
        if not 4 <= self.width <= 4096:
            raise ConfigError("encoder-width", "must be in [4, 4096]", value=self.width, fix="e.g. encoder-width=64")
        _one_of("image-encoder", self.image_encoder, IMAGE_ENCODERS)
        _one_of("audio-encoder", self.audio_encoder, AUDIO_ENCODERS)
        _one_of("text-encoder", self.text_encoder, TEXT_ENCODERS)
        _one_of("sensor-encoder", self.sensor_encoder, SENSOR_ENCODERS)
        _one_of("contrastive", self.contrastive, CONTRASTIVE)
        if self.image_encoder == "pretrained" and not self.image_weights:
            raise ConfigError(
                "image-weights", "image-encoder='pretrained' needs the weights of the frozen image encoder", value="",
                fix="set image-weights=PATH to a file saved with fedmm.models.save_image_encoder (see benchmarks/pretrain_image_encoder.py)",
            )
        if not (np.isfinite(self.contrastive_weight) and self.contrastive_weight >= 0):
            raise ConfigError("contrastive-weight", "must be a finite number >= 0", value=self.contrastive_weight, fix="e.g. contrastive-weight=0.1")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ConfigError("modality-dropout", "must be in [0, 1)", value=self.modality_dropout, fix="e.g. modality-dropout=0.2")
        names = [name for name, _ in self.tasks]
        for name, weight in self.tasks:
            if not (np.isfinite(weight) and weight > 0):
                raise ConfigError("tasks", f"task {name!r} needs a positive loss weight", value=weight, fix="e.g. tasks='speaker:0.5'")
            if not name or name == "label" or names.count(name) > 1:
                raise ConfigError("tasks", f"task {name!r} is empty, repeated or the main task's name", value=",".join(names), fix="name each group column once, e.g. tasks='speaker:0.5'")

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ModelOptions:
        """The options of a run; ``image-encoder=auto`` is scattering on AV-MNIST, a CNN elsewhere."""
        image = cfg.image_encoder
        if image == "auto":
            image = "scattering" if cfg.data.partition(":")[0] == "avmnist" else "cnn"
        if cfg.dp and cfg.contrastive == "clip":
            raise ConfigError(
                "contrastive", "CLIP's in-batch negatives make each record's loss depend on the other records of its batch, "
                "so DP-SGD's per-record clipping no longer bounds a record's influence", value="clip",
                fix="use contrastive='align' (matches the modalities within each record) under DP, or set dp=false",
            )
        return cls(
            width=cfg.encoder_width, image_encoder=image, image_weights=cfg.image_weights, audio_encoder=cfg.audio_encoder,
            text_encoder=cfg.text_encoder, sensor_encoder=cfg.sensor_encoder,
            modalities=tuple(m.strip() for m in cfg.modalities.split(",") if m.strip()),
            tasks=_parse_tasks(cfg.tasks), contrastive=cfg.contrastive, contrastive_weight=cfg.contrastive_weight,
            modality_dropout=cfg.modality_dropout,
        )

    def describe(self) -> dict[str, Any]:
        """The options as plain JSON values (for the model card)."""
        out = dataclasses.asdict(self)
        out["tasks"] = [list(t) for t in self.tasks]
        out["modalities"] = list(self.modalities)
        return out


def _parse_tasks(text: str) -> tuple[tuple[str, float], ...]:
    """``"speaker:0.5,site"`` -> ``(("speaker", 0.5), ("site", 1.0))``."""
    tasks = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, weight = part.partition(":")
        try:
            tasks.append((name.strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise ConfigError("tasks", f"task {name!r} has a weight that is not a number", value=text, fix="e.g. tasks='speaker:0.5'") from None
    return tuple(tasks)
