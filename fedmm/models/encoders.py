"""Per-modality encoders. Each declares its output width in ``out_features``.

Only layers Opacus supports as they are (Linear, GroupNorm, pooling, Tanh) are
used, so ``opacus.validators.ModuleValidator`` passes without fixes and the
server and the sites build the same state_dict layout. Tanh rather than ReLU:
bounded activations train better under DP-SGD's clipping and noise (Papernot
et al., "Tempered Sigmoid Activations for Deep Learning with Differential
Privacy", AAAI 2021), which our tuning on AV-MNIST confirmed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ScatteringImageEncoder", "PooledSpectrogramEncoder", "ConvImageEncoder", "HashedTextEncoder", "SensorEncoder", "TabularEncoder"]


class ScatteringImageEncoder(nn.Module):
    """Linear encoder over 2-D scattering maps ``[N, channels, 7, 7]`` (see ``fedmm.data.features``).

    Each group of scattering channels is standardised per sample (GroupNorm without
    learned parameters), pooled to ``pool`` and projected to ``out_features``.
    """

    def __init__(self, *, channels: int = 81, groups: int = 27, pool: tuple[int, int] = (3, 3), out_features: int = 64) -> None:
        super().__init__()
        self.out_features = out_features
        self.net = nn.Sequential(
            nn.GroupNorm(groups, channels, affine=False),
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
            nn.Linear(channels * pool[0] * pool[1], out_features),
            nn.Tanh(),
        )

    def forward(self, scattering: Tensor) -> Tensor:
        return self.net(scattering)


class PooledSpectrogramEncoder(nn.Module):
    """Linear encoder over a time-frequency map ``[N, 1, mels, frames]``, average-pooled to ``pool``."""

    def __init__(self, *, pool: tuple[int, int] = (16, 16), out_features: int = 64) -> None:
        super().__init__()
        self.out_features = out_features
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(pool[0] * pool[1], out_features), nn.Tanh())

    def forward(self, spectrogram: Tensor) -> Tensor:
        return self.net(spectrogram)


class ConvImageEncoder(nn.Module):
    """A small CNN over raw pixels ``[N, C, H, W]`` (GroupNorm, so Opacus needs no fixes)."""

    def __init__(self, *, channels: int, out_features: int = 64) -> None:
        super().__init__()
        self.out_features = out_features
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 5, stride=2, padding=2), nn.GroupNorm(4, 16), nn.Tanh(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.Tanh(),
            nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(), nn.Linear(32 * 16, out_features), nn.Tanh(),
        )

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)


class HashedTextEncoder(nn.Module):
    """Mean of token embeddings over non-padding ids ``[N, L]`` (0 pads), then a projection."""

    def __init__(self, *, buckets: int, dim: int = 32, out_features: int = 64) -> None:
        super().__init__()
        self.out_features = out_features
        self.embedding = nn.Embedding(buckets, dim)
        self.proj = nn.Sequential(nn.Linear(dim, out_features), nn.Tanh())

    def forward(self, tokens: Tensor) -> Tensor:
        mask = (tokens > 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        summed = (self.embedding(tokens) * mask).sum(dim=1)
        return self.proj(summed / mask.sum(dim=1).clamp(min=1.0))


class SensorEncoder(nn.Module):
    """1-D convolutions over a multichannel series ``[N, C, T]``, pooled over time.

    With ``stats`` (``sensor-norm = window-stats``) the input is ``[N, C + stats, T]``: the
    first ``C`` channels the standardised shape, the rest each window's per-channel mean
    and deviation (constant over time). Those skip the convolutions, whose group norms would
    wash them out, and join the pooled features before the last layer.
    """

    def __init__(self, *, channels: int, out_features: int = 64, stats: int = 0) -> None:
        super().__init__()
        self.out_features = out_features
        self.channels, self.stats = channels, stats
        self.conv = nn.Sequential(
            nn.Conv1d(channels, 16, 5, padding=2), nn.GroupNorm(4, 16), nn.Tanh(),
            nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.GroupNorm(4, 32), nn.Tanh(),
            nn.AdaptiveAvgPool1d(8), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(32 * 8 + stats, out_features), nn.Tanh())

    def forward(self, series: Tensor) -> Tensor:
        features = self.conv(series[:, : self.channels])
        if self.stats:
            features = torch.cat([features, series[:, self.channels :, 0]], dim=1)
        return self.head(features)


class TabularEncoder(nn.Module):
    """One linear layer over standardised values ``[N, D]``."""

    def __init__(self, *, width: int, out_features: int = 64) -> None:
        super().__init__()
        self.out_features = out_features
        self.net = nn.Sequential(nn.Linear(width, out_features), nn.Tanh())

    def forward(self, values: Tensor) -> Tensor:
        return self.net(values)
