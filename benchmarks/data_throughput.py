"""Load + preprocess throughput on the full AV-MNIST (../shared/data: 3,000 recordings + images).

Stages, each timed cold (caches cleared) ``--repeats`` times, median reported, with its
ratio to the raw-decode baseline measured in the same run:

1. baseline: decode every WAV (soundfile) and read the MNIST IDX files, nothing else;
2. avmnist: fedmm's AV-MNIST loader: decode, pair, log-mel, normalise (all 6 sites + test);
3. avmnist + scattering: stage 2 plus the scattering features the default AV-MNIST model trains on;
4. manifest: the same 3,000 samples written as a CSV manifest (PNG images, WAV audio,
   a text column), loaded by ``load_manifest``: Pillow decode + resize, soundfile,
   log-mel, tokenizing, presence masks. (Writing the PNGs is not timed.)

Usage: python benchmarks/data_throughput.py [--root ../shared/data] [--repeats 3]
Target (issue 3): the whole of stage 2 under 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from fedmm.data import avmnist, manifest
from fedmm.data.idx import read_idx
from fedmm.data.preprocess import Preprocessing
from fedmm.models import ModelOptions, ModelRecipe

SCATTERING = ModelRecipe("concat", ModelOptions(image_encoder="scattering"))  # the default AV-MNIST model's inputs


def _clear() -> None:
    avmnist._load.cache_clear()
    avmnist._mnist.cache_clear()
    manifest._load_manifest.cache_clear()


def baseline(root: Path) -> int:
    n = 0
    for wav in sorted((root / "fsdd" / "recordings").glob("*.wav")):
        sf.read(wav, dtype="float32")
        n += 1
    read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz")
    read_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz")
    return n


def load_avmnist(root: Path) -> int:
    return len(avmnist.load_pool(root)) + len(avmnist.load_test(root))


def load_avmnist_scattering(root: Path) -> int:
    pool, test = avmnist.load_pool(root), avmnist.load_test(root)
    return len(SCATTERING.prepare(pool)) + len(SCATTERING.prepare(test))


def write_manifest(root: Path, folder: Path) -> Path:
    """The full AV-MNIST as a manifest: PNG images, symlinked WAVs, a short text."""
    from PIL import Image

    images = read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz")
    rows = []
    for split, loader in (("train", avmnist.load_pool), ("test", avmnist.load_test)):
        ds = loader(root)
        for stem, image_id, speaker in zip(ds.ids, ds.groups["image_id"], ds.groups["speaker"]):
            png = folder / f"{image_id}.png"
            Image.fromarray(images[image_id]).save(png)
            wav = folder / f"{stem}.wav"
            os.symlink(root / "fsdd" / "recordings" / f"{stem}.wav", wav)
            rows.append({"image": png.name, "audio": wav.name, "text": f"spoken by {speaker}", "label": stem[0], "site": speaker, "split": split})
    return manifest.write_manifest(folder / "manifest.csv", rows)


def timed(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeats):
        _clear()
        start = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    # Warm-up (not timed): librosa's numba kernels compile on first use, imports load.
    avmnist.log_mel(np.zeros((1, avmnist.CLIP_SAMPLES), np.float32))
    SCATTERING.prepare(avmnist.load_test(args.root))

    with tempfile.TemporaryDirectory() as tmp:
        path = write_manifest(args.root, Path(tmp))
        prep = Preprocessing()
        stages = [
            ("baseline: decode WAV + read IDX", lambda: baseline(args.root)),
            ("avmnist loader (log-mel, pairing)", lambda: load_avmnist(args.root)),
            ("avmnist loader + scattering", lambda: load_avmnist_scattering(args.root)),
            ("manifest: PNG+WAV+text (Pillow, librosa)", lambda: len(manifest.load_manifest(path, prep))),
        ]
        results = [(name, *timed(fn, args.repeats)) for name, fn in stages]
    base = results[0][1]
    print(f"{'stage':44s} {'samples':>8s} {'median s':>9s} {'samples/s':>10s} {'x baseline':>10s}")
    for name, seconds, n in results:
        print(f"{name:44s} {n:8d} {seconds:9.2f} {n / seconds:10.0f} {seconds / base:10.2f}")
    print(f"(median of {args.repeats}, {os.cpu_count()} cores; target: avmnist loader < 30 s)")


if __name__ == "__main__":
    main()
