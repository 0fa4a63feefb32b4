"""Data: loaders for real multimodal sources and per-modality preprocessing.

- AV-MNIST (``fedmm.data.avmnist``): MNIST images paired with FSDD spoken digits,
  six speaker sites, the built-in federation;
- BasicMotions (``fedmm.data.sensors``): smartwatch accelerometer and gyroscope
  series from the UEA ``.ts`` format.
"""

from fedmm.data.avmnist import SPEAKERS, MultimodalArrays, builtin_root, load_site, load_test, resolve_root
from fedmm.data.sensors import SensorSeries, load_basicmotions, read_ts

__all__ = [
    "SPEAKERS",
    "MultimodalArrays",
    "builtin_root",
    "load_site",
    "load_test",
    "resolve_root",
    "SensorSeries",
    "load_basicmotions",
    "read_ts",
]
