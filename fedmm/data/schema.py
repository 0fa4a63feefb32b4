"""The modality schema and the one in-memory form every data source is loaded into.

A :class:`MultimodalDataset` holds, for ``N`` samples, one feature array per
modality, an explicit presence mask ``[N, M]`` (a sample may lack modalities:
its features are zeros *and* its mask says so, so the model can tell), integer
labels into :attr:`Schema.classes`, and per-sample group columns (speaker,
subject, site) that natural partitioners split by.

>>> schema = Schema((Modality("image", ModalityKind.IMAGE, (1, 2, 2), "pixels"),), ("a", "b"))
>>> ds = MultimodalDataset(schema, {"image": np.zeros((3, 1, 2, 2), np.float32)},
...                        np.array([[True], [False], [True]]), np.array([0, 1, 1]), ids=("r1", "r2", "r3"))
>>> ds.counts()["per_modality"], ds.counts()["per_class"]
({'image': 2}, {'a': 1, 'b': 2})
>>> len(ds.subset([0, 2]))
2
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

__all__ = ["ModalityKind", "Modality", "Schema", "MultimodalDataset", "UNLABELLED", "STATS_SERIES"]

UNLABELLED = -1  # label of a sample whose label is missing


class ModalityKind(StrEnum):
    """The kinds of modality fedmm loads, preprocesses and encodes."""

    IMAGE = "image"
    AUDIO = "audio"
    TEXT = "text"
    SENSOR = "sensor"
    TABULAR = "tabular"


STATS_SERIES = "series+stats"  # a sensor series followed by each window's statistics (sensor-norm=window-stats)


@dataclass(frozen=True)
class Modality:
    """One modality of a dataset: its name (``image``, ``image:front``, ``gyroscope``),
    its kind, the per-sample feature shape, and what the features are
    (``pixels``, ``scattering``, ``log-mel``, ``mfcc``, ``tokens``, ``series``, ``values``)."""

    name: str
    kind: ModalityKind
    shape: tuple[int, ...]
    representation: str
    vocab: int = 0  # token ids lie in [0, vocab) ("tokens" only; 0 pads)

    @property
    def dtype(self) -> np.dtype[Any]:
        """Token ids are integers; everything else is float32."""
        return np.dtype(np.int64) if self.representation == "tokens" else np.dtype(np.float32)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": str(self.kind), "shape": list(self.shape), "representation": self.representation}
        if self.vocab:
            out["vocab"] = self.vocab
        return out


@dataclass(frozen=True)
class Schema:
    """The modalities (in model input order), the class names of a federation and, for
    multi-task models, the auxiliary tasks: a group column each (``speaker``) with its
    class names, predicted by extra heads."""

    modalities: tuple[Modality, ...]
    classes: tuple[str, ...]
    tasks: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def modality(self, name: str) -> Modality:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_json(self) -> str:
        """A canonical text form: two schemas are the same model input iff these are equal."""
        out: dict[str, Any] = {"modalities": [m.describe() for m in self.modalities], "classes": list(self.classes)}
        if self.tasks:
            out["tasks"] = [[name, list(classes)] for name, classes in self.tasks]  # a list: order is the head order
        return json.dumps(out, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Schema:
        data = json.loads(text)
        mods = tuple(
            Modality(m["name"], ModalityKind(m["kind"]), tuple(m["shape"]), m["representation"], m.get("vocab", 0)) for m in data["modalities"]
        )
        tasks = tuple((name, tuple(classes)) for name, classes in data.get("tasks", []))
        return cls(mods, tuple(data["classes"]), tasks)


@dataclass(frozen=True, eq=False)
class MultimodalDataset:
    """Aligned per-sample arrays of one split (a site's training data or a test set)."""

    schema: Schema
    features: Mapping[str, np.ndarray]  # modality name -> [N, *modality.shape]
    present: np.ndarray  # bool [N, M], column j is schema.modalities[j]
    label: np.ndarray  # int64 [N]; UNLABELLED (-1) where the label is missing
    groups: Mapping[str, np.ndarray] = field(default_factory=dict)  # e.g. speaker, subject, site: [N]
    ids: tuple[str, ...] = ()  # where each sample came from (file stem, manifest row)
    skipped: Mapping[str, int] = field(default_factory=dict)  # lenient loading: reason -> rows skipped
    synthetic: bool = False

    def __post_init__(self) -> None:
        n = len(self.label)
        if self.present.shape != (n, len(self.schema.modalities)):
            raise ValueError(f"presence mask has shape {self.present.shape}, expected {(n, len(self.schema.modalities))}")
        for m in self.schema.modalities:
            array = self.features[m.name]
            if array.shape != (n, *m.shape):
                raise ValueError(f"modality {m.name!r} has shape {array.shape}, expected {(n, *m.shape)}")
        if self.ids and len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids for {n} samples")

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> MultimodalDataset:
        """The samples at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return MultimodalDataset(
            self.schema,
            {k: v[idx] for k, v in self.features.items()},
            self.present[idx],
            self.label[idx],
            {k: v[idx] for k, v in self.groups.items()},
            tuple(self.ids[i] for i in idx) if self.ids else (),
            dict(self.skipped),
            self.synthetic,
        )

    def replace(self, **changes: Any) -> MultimodalDataset:
        """A copy with some fields changed (checked again)."""
        values = {f: getattr(self, f) for f in ("schema", "features", "present", "label", "groups", "ids", "skipped", "synthetic")}
        values.update(changes)
        return MultimodalDataset(**values)

    def labelled(self) -> MultimodalDataset:
        """Only the samples that have a label (supervised training uses these); ``self`` when all have one."""
        keep = self.label != UNLABELLED
        return self if bool(keep.all()) else self.subset(np.flatnonzero(keep))

    def counts(self) -> dict[str, Any]:
        """Samples per class and per modality, unlabelled samples, and lenient skips."""
        per_class = {
            name: int(n) for name, n in zip(self.schema.classes, np.bincount(self.label[self.label >= 0], minlength=self.schema.num_classes))
        }
        return {
            "samples": len(self),
            "per_class": per_class,
            "unlabelled": int((self.label == UNLABELLED).sum()),
            "per_modality": {m.name: int(self.present[:, j].sum()) for j, m in enumerate(self.schema.modalities)},
            "skipped": dict(self.skipped),
        }
