"""A seeded SYNTHETIC multimodal dataset of any size, for scale tests and benchmarks.

It is not real data and every artifact says so (``synthetic: true``). Each class
has a random prototype per modality; a sample is its class's prototype plus
noise, so a model can learn it, and no modality alone is perfect:

- ``image`` ``[1, 16, 16]`` pixels, ``audio`` ``[1, 16, 32]`` log-mel-like maps,
- ``text`` 16 hashed token ids (half drawn from the class's preferred words),
- ``sensor`` ``[3, 64]``: sinusoids whose frequency depends on the class,
- ``tabular`` ``[8]`` values around a class mean;
- group ``cluster``: 8 random clusters, for natural-partition experiments.

>>> ds = make_synthetic(100, seed=1)
>>> len(ds), ds.synthetic, ds.schema.names
(100, True, ('image', 'audio', 'text', 'sensor', 'tabular'))
>>> bool((make_synthetic(100, seed=1).features["image"] == ds.features["image"]).all())
True
"""

from __future__ import annotations

import numpy as np

from fedmm.data.schema import Modality, ModalityKind, MultimodalDataset, Schema

__all__ = ["SYNTHETIC_SCHEMA", "make_synthetic"]

SYNTHETIC_SCHEMA = Schema(
    (
        Modality("image", ModalityKind.IMAGE, (1, 16, 16), "pixels"),
        Modality("audio", ModalityKind.AUDIO, (1, 16, 32), "log-mel"),
        Modality("text", ModalityKind.TEXT, (16,), "tokens", 4096),
        Modality("sensor", ModalityKind.SENSOR, (3, 64), "series"),
        Modality("tabular", ModalityKind.TABULAR, (8,), "values"),
    ),
    tuple(f"class-{k}" for k in range(10)),
)
_BUCKETS = 4096


def make_synthetic(n: int, *, seed: int = 0, prototype_seed: int = 1234, noise: float = 1.5) -> MultimodalDataset:
    """``n`` synthetic samples; ``seed`` draws the samples, ``prototype_seed`` the classes
    (keep it fixed so that a training and a test set share their classes)."""
    if n < 1:
        raise ValueError(f"need at least one sample, got {n}")
    protos = np.random.default_rng(prototype_seed)
    k = SYNTHETIC_SCHEMA.num_classes
    image_p = protos.normal(size=(k, 1, 16, 16)).astype(np.float32)
    audio_p = protos.normal(size=(k, 1, 16, 32)).astype(np.float32)
    words = protos.integers(1, _BUCKETS, size=(k, 12))
    freq = np.linspace(1.0, 6.0, k)
    tab_p = protos.normal(size=(k, 8)).astype(np.float32)

    rng = np.random.default_rng(seed)
    label = rng.integers(0, k, size=n)
    image = image_p[label] + noise * rng.normal(size=(n, 1, 16, 16)).astype(np.float32)
    audio = audio_p[label] + noise * rng.normal(size=(n, 1, 16, 32)).astype(np.float32)
    text = np.where(rng.random((n, 16)) < 0.5, words[label[:, None], rng.integers(0, 12, (n, 16))], rng.integers(1, _BUCKETS, (n, 16)))
    lengths = rng.integers(6, 17, size=n)
    text[np.arange(16)[None, :] >= lengths[:, None]] = 0
    t = np.linspace(0, 1, 64, dtype=np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 3, 1))
    sensor = np.sin(2 * np.pi * freq[label][:, None, None] * t + phase) + noise * 0.5 * rng.normal(size=(n, 3, 64))
    tabular = tab_p[label] + noise * rng.normal(size=(n, 8)).astype(np.float32)
    return MultimodalDataset(
        SYNTHETIC_SCHEMA,
        {
            "image": image.astype(np.float32), "audio": audio.astype(np.float32), "text": text.astype(np.int64),
            "sensor": sensor.astype(np.float32), "tabular": tabular.astype(np.float32),
        },
        np.ones((n, 5), dtype=bool),
        label.astype(np.int64),
        {"cluster": rng.integers(0, 8, size=n).astype(str)},
        tuple(f"synthetic-{seed}-{i}" for i in range(n)),
        synthetic=True,
    )
