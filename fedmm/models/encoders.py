"""Per-modality encoders. Each declares its output width in ``out_features``.

Only layers Opacus supports as they are (Conv2d, Linear, GroupNorm, ReLU) are
used, so ``opacus.validators.ModuleValidator`` passes without fixes and the
server and the sites build the same state_dict layout.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ImageEncoder", "SpectrogramEncoder"]


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """A stride-2 3x3 convolution, group norm and ReLU: halves height and width."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
        nn.GroupNorm(num_groups=min(4, out_channels), num_channels=out_channels),
        nn.ReLU(),
    )


class ImageEncoder(nn.Module):
    """Small CNN for 1x28x28 images: two stride-2 convolutions and a linear projection."""

    def __init__(self, *, channels: int = 16, out_features: int = 64) -> None:
        super().__init__()
        self.out_features = out_features
        self.features = nn.Sequential(_conv_block(1, channels // 2), _conv_block(channels // 2, channels))
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, out_features), nn.ReLU())

    def forward(self, image: Tensor) -> Tensor:
        return self.project(self.pool(self.features(image)))


class SpectrogramEncoder(nn.Module):
    """Small CNN for 1 x mels x frames log-mel spectrograms."""

    def __init__(self, *, channels: int = 16, out_features: int = 64) -> None:
        super().__init__()
        self.out_features = out_features
        self.features = nn.Sequential(_conv_block(1, channels // 2), _conv_block(channels // 2, channels))
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, out_features), nn.ReLU())

    def forward(self, spectrogram: Tensor) -> Tensor:
        return self.project(self.pool(self.features(spectrogram)))
