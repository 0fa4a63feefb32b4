"""Data: sources, the modality schema, preprocessing, augmentation and federations.

- ``fedmm.data.schema``: modalities, :class:`MultimodalDataset` (features, presence mask, labels);
- ``fedmm.data.sources``: what ``data=`` can name (avmnist, basicmotions, manifest, synthetic);
- ``fedmm.data.manifest`` (``manifest_table``, ``labels``): a site's own files described by a
  CSV/Parquet manifest, its rows numbered as a spreadsheet does, its labels in one canonical form;
- ``fedmm.data.decoders`` / ``fedmm.data.checks``: decoding one image, recording or ``.npy``
  file, within size limits checked from the header; the skip reasons and row-level errors;
- ``fedmm.data.preprocess`` / ``fedmm.data.augment``: per-modality preprocessing and augmentation;
- ``fedmm.data.partition``: simulated federations with flwr-datasets partitioners.

May import ``fedmm.config``, ``fedmm.errors`` and ``fedmm.protocol`` only: data knows no
model, no privacy mechanism and no Flower app. Submodules are imported on first use (audio and partitioning libraries are slow to import).
"""

from __future__ import annotations

from fedmm._lazy import lazy_exports

_EXPORTS = {
    "SPEAKERS": "fedmm.data.avmnist",
    "builtin_root": "fedmm.data.avmnist",
    "load_site": "fedmm.data.avmnist",
    "load_test": "fedmm.data.avmnist",
    "resolve_root": "fedmm.data.avmnist",
    "Modality": "fedmm.data.schema",
    "ModalityKind": "fedmm.data.schema",
    "MultimodalDataset": "fedmm.data.schema",
    "Schema": "fedmm.data.schema",
    "Source": "fedmm.data.sources",
    "load_source": "fedmm.data.sources",
    "load_manifest": "fedmm.data.manifest",
    "check_manifest": "fedmm.data.manifest",
    "canonical_label": "fedmm.data.labels",
    "Preprocessing": "fedmm.data.preprocess",
    "Federation": "fedmm.data.partition",
    "FederationPlan": "fedmm.data.partition",
    "build_federation": "fedmm.data.partition",
    "SensorSeries": "fedmm.data.sensors",
    "load_basicmotions": "fedmm.data.sensors",
    "read_ts": "fedmm.data.sensors",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("fedmm.data", _EXPORTS)
