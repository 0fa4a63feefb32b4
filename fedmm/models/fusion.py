"""Fusion models: one encoder per modality, a fusion step, a classifier head.

Every model takes one tensor per modality, in schema order, then the presence
mask ``[B, M]`` (1.0 present, 0.0 absent): ``model(*modalities, present)``. An
absent modality's embedding is multiplied by 0 and the mask itself is an input
of the head, so the model knows what is missing instead of reading zeros as data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConcatFusionNet"]


class ConcatFusionNet(nn.Module):
    """Early fusion by concatenation of masked modality embeddings (and the mask), then a linear head."""

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, num_classes: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        width = sum(int(e.out_features) for e in self.encoders) + len(self.encoders)  # type: ignore[arg-type, misc]
        self.head = nn.Linear(width, num_classes)

    def forward(self, *inputs: Tensor) -> Tensor:
        *modalities, present = inputs
        parts = [encoder(x) * present[:, j : j + 1] for j, (encoder, x) in enumerate(zip(self.encoders, modalities))]
        return self.head(torch.cat([*parts, present], dim=1))
