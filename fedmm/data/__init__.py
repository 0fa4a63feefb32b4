"""Data: loaders for the built-in AV-MNIST federation and per-modality preprocessing."""

from fedmm.data.avmnist import SPEAKERS, MultimodalArrays, builtin_root, load_site, load_test, resolve_root

__all__ = ["SPEAKERS", "MultimodalArrays", "builtin_root", "load_site", "load_test", "resolve_root"]
