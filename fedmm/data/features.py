"""Fixed, data-independent feature transforms (no statistic is learned or shared).

Under DP-SGD, fixed hand-crafted features with a small trainable model beat
end-to-end CNNs on small data (Tramer and Boneh, "Differentially Private
Learning Needs Better Features (or Much More Data)", ICLR 2021): the scattering
transform of Mallat, computed with kymatio, is their image feature.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["scattering_2d"]


@functools.lru_cache(maxsize=4)
def _scattering(shape: tuple[int, int], J: int) -> torch.nn.Module:
    # kymatio 0.3's `kymatio.torch` also imports its 3-D transform, which needs a SciPy
    # function (sph_harm) that recent SciPy removed; the 2-D frontend does not.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=J, shape=shape)


def scattering_2d(images: np.ndarray, *, J: int = 2, batch_size: int = 512) -> np.ndarray:
    """2-D scattering coefficients of ``[N, 1, H, W]`` images: ``[N, 1 + 8J + 32J(J-1), H/2^J, W/2^J]``.

    With ``J=2`` a 28x28 image gives 81 maps of 7x7.
    """
    images = np.asarray(images, dtype=np.float32)
    n, channels, height, width = images.shape
    transform = _scattering((height, width), J)
    if n == 0:  # the shape of the coefficients, from one blank image
        return scattering_2d(np.zeros((1, channels, height, width), np.float32), J=J)[:0]
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(np.array(images[start : start + batch_size]))  # a writable copy
            coeffs = transform(batch)  # [B, C, K, H', W']
            out.append(coeffs.reshape(coeffs.shape[0], channels * coeffs.shape[2], *coeffs.shape[3:]).numpy())
    return np.concatenate(out).astype(np.float32)
