"""Fusion models: encoders per modality, a fusion step, a classifier head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedmm.models.encoders import ImageEncoder, SpectrogramEncoder

__all__ = ["ConcatFusionNet"]


class ConcatFusionNet(nn.Module):
    """Early fusion by concatenation of an image and an audio embedding.

    ``forward(image, audio)`` returns class logits.
    """

    def __init__(self, *, num_classes: int = 10, embed: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.image_encoder = ImageEncoder(out_features=embed)
        self.audio_encoder = SpectrogramEncoder(out_features=embed)
        width = self.image_encoder.out_features + self.audio_encoder.out_features
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, image: Tensor, audio: Tensor) -> Tensor:
        fused = torch.cat([self.image_encoder(image), self.audio_encoder(audio)], dim=1)
        return self.head(fused)
