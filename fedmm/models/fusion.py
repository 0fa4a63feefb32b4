"""Fusion models: one encoder per modality, a fusion step, a classifier head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConcatFusionNet"]


class ConcatFusionNet(nn.Module):
    """Early fusion by concatenation of an image and an audio embedding, then a linear head.

    ``forward(image, audio)`` returns class logits.
    """

    def __init__(self, *, image_encoder: nn.Module, audio_encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.audio_encoder = audio_encoder
        width = int(image_encoder.out_features) + int(audio_encoder.out_features)  # type: ignore[arg-type]
        self.head = nn.Linear(width, num_classes)

    def forward(self, image: Tensor, audio: Tensor) -> Tensor:
        fused = torch.cat([self.image_encoder(image), self.audio_encoder(audio)], dim=1)
        return self.head(fused)
