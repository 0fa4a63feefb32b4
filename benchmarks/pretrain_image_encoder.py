"""Pretrain fedmm's CNN image encoder on public images, for embedding fusion.

``model='embedding'`` fuses frozen pretrained features. For images a site points
``image-weights`` at a pretrained encoder; this script makes one the honest way for
the AV-MNIST benchmark: it trains on MNIST test-split images that the built-in
AV-MNIST never uses (it takes the first 300 of each digit, this script skips them),
standing in for a public pretraining set. No site data is touched, so the frozen
encoder costs no privacy budget.

Usage: python benchmarks/pretrain_image_encoder.py OUT.pt [--mnist ../shared/data/mnist] [--epochs 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmm.data.idx import read_idx
from fedmm.models import save_image_encoder
from fedmm.models.encoders import ConvImageEncoder

SKIP_PER_DIGIT = 300  # the built-in AV-MNIST's images (see fedmm/data/builtin/avmnist/SOURCE.md)


def public_images(mnist: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test-split images outside the built-in AV-MNIST subset, scaled as fedmm loads images."""
    images = read_idx(mnist / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(mnist / "t10k-labels-idx1-ubyte.gz")
    keep = np.concatenate([np.flatnonzero(labels == d)[SKIP_PER_DIGIT:] for d in range(10)])
    # fedmm.data.preprocess scales pixels to [-1, 1]; the AV-MNIST loader to [0, 1]
    return (images[keep].astype(np.float32)[:, None] / 255.0), labels[keep].astype(np.int64)


def pretrain(out: Path, mnist: Path, *, width: int = 64, epochs: int = 3, seed: int = 0) -> dict[str, float]:
    """Train encoder + linear head (plain SGD; public data), save the encoder; return figures."""
    x, y = public_images(mnist)
    torch.manual_seed(seed)
    encoder = ConvImageEncoder(channels=1, out_features=width)
    model = nn.Sequential(encoder, nn.Linear(width, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = time.perf_counter()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = order[i : i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    save_image_encoder(encoder, out)
    return {"images": float(len(x)), "train_accuracy": accuracy, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mnist", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    figures = pretrain(args.out, args.mnist, epochs=args.epochs)
    print(f"pretrained on {figures['images']:.0f} public images in {figures['seconds']:.0f} s, train accuracy {figures['train_accuracy']:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
