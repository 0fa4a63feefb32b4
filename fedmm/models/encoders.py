"""Per-modality encoders. Each declares its output width in ``out_features``.

Only layers Opacus supports as they are (Linear, GroupNorm, pooling, Tanh) are
used, so ``opacus.validators.ModuleValidator`` passes without fixes and the
server and the sites build the same state_dict layout. Tanh rather than ReLU:
bounded activations train better under DP-SGD's clipping and noise (Papernot
et al., "Tempered Sigmoid Activations for Deep Learning with Differential
Privacy", AAAI 2021), which our tuning on AV-MNIST confirmed.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ScatteringImageEncoder", "PooledSpectrogramEncoder"]


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
