"""Data sources by name: what the run config's ``data`` key can say.

=========================  ==============================================================
``avmnist[:ROOT]``         MNIST images + FSDD spoken digits; natural sites = speakers
                           (built-in real subset, or a root laid out like shared/data)
``basicmotions[:ROOT]``    smartwatch accelerometer + gyroscope as two sensor modalities
                           (built-in copy, or ``ROOT/basicmotions/*.ts``)
``manifest:PATH``          a CSV or Parquet manifest (see :mod:`fedmm.data.manifest`);
                           natural sites = its ``site`` column
``synthetic[:N]``          N seeded SYNTHETIC samples (default 2000), for scale tests
=========================  ==============================================================

A source gives a training *pool* (which the partitioners split into sites, or
which one deployed site trains on whole) and a held-out *test* set for the
server's central evaluation.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from fedmm.data.preprocess import Preprocessing
from fedmm.data.schema import ModalityKind, MultimodalDataset, Schema
from fedmm.errors import ConfigError, DataError

__all__ = ["Source", "load_source", "SOURCE_NAMES"]

SOURCE_NAMES = ("avmnist", "basicmotions", "manifest", "synthetic")


@dataclass(frozen=True, eq=False)
class Source:
    """A loaded data source: the training pool, the test set, and its natural grouping; for a
    manifest loaded leniently, the skipped rows per site (training rows) and among the test rows."""

    name: str
    pool: MultimodalDataset  # may be empty: a manifest whose rows are all split=test
    test: MultimodalDataset | None  # None: nothing held out (a deployed site's own data)
    natural_by: str | None  # the group column that names natural sites
    skipped_by_site: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # site -> reason -> training rows skipped
    skipped_test: Mapping[str, int] = field(default_factory=dict)  # reason -> split=test rows skipped

    def require_test(self) -> MultimodalDataset:
        """The held-out set for the server's evaluation, or an error saying how to get one."""
        if (self.test is None or len(self.test) == 0) and self.skipped_test:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped_test.items()))
            raise DataError(
                "manifest", f"every split=test row ({sum(self.skipped_test.values())}) was skipped by lenient loading ({reasons}), "
                "so the server has no test set", fix="fix the test rows that `fedmm data check MANIFEST --lenient` lists",
            )
        if self.test is None or len(self.test) == 0:
            raise ConfigError(
                "test-fraction", f"0 rows of {self.name} are held out for the server's evaluation (no split=test row, "
                "and test-fraction of the rows rounds to 0)",
                fix="mark some manifest rows split=test, or set test-fraction > 0 (e.g. 0.2)",
            )
        return self.test

    @property
    def schema(self) -> Schema:
        return self.pool.schema


def load_source(
    spec: str, prep: Preprocessing, *, classes: tuple[str, ...] = (), lenient: bool = False, test_fraction: float = 0.2,
    roots: tuple[str, ...] = (),
) -> Source:
    """Resolve and load the run config's ``data`` value (cached per process).

    ``roots``: the folders a manifest's file paths may lead into (default: the manifest's own).

    Raises
    ------
    ConfigError
        For an unknown source name or a malformed value.
    DataError
        For missing or bad files (see each loader).
    """
    return _load_source(spec, prep, tuple(classes), lenient, test_fraction, tuple(str(r) for r in roots))


@functools.lru_cache(maxsize=4)
def _load_source(spec: str, prep: Preprocessing, classes: tuple[str, ...], lenient: bool, test_fraction: float, roots: tuple[str, ...]) -> Source:
    name, sep, location = spec.partition(":")
    if name == "avmnist":
        from fedmm.data.avmnist import load_pool, load_test, resolve_root

        root = resolve_root(spec)
        return Source(name, load_pool(root), load_test(root), "speaker")
    if name == "basicmotions":
        return _basicmotions(location, prep.sensor_length)
    if name == "manifest":
        if not location:
            raise ConfigError("data", "a manifest source needs a path", value=spec, fix="data='manifest:/path/to/manifest.csv'")
        return _manifest(Path(location).expanduser(), prep, classes, lenient, test_fraction, roots)
    if name == "synthetic":
        from fedmm.data.synthetic import make_synthetic

        try:
            n = int(location) if location else 2000
        except ValueError:
            raise ConfigError("data", "synthetic size must be an integer", value=spec, fix="data='synthetic:5000'") from None
        if n < 10:
            raise ConfigError("data", "synthetic size must be at least 10", value=spec, fix="data='synthetic:2000'")
        return Source(name, make_synthetic(n, seed=1), make_synthetic(max(10, n // 4), seed=2), "cluster")
    raise ConfigError("data", "unknown data source", value=spec, fix=f"use one of: {', '.join(SOURCE_NAMES)} (e.g. 'manifest:PATH')")


def _basicmotions(location: str, sensor_length: int | None = None) -> Source:
    from fedmm.data.schema import Modality
    from fedmm.data.sensors import BASICMOTIONS_MODALITIES, SensorSeries, load_basicmotions

    root = Path(location).expanduser() if location else Path(str(resources.files("fedmm.data").joinpath("builtin", "basicmotions")))
    if not root.is_dir():
        raise ConfigError("data", f"BasicMotions root {root} is not a folder", value=f"basicmotions:{location}", fix="point it at a folder holding basicmotions/*.ts")
    if not (root / "basicmotions").is_dir():
        inside = (root / "BasicMotions_TRAIN.ts").is_file() or root.name.lower() == "basicmotions"
        parent = root.resolve().parent
        raise ConfigError(
            "data", f"{root} has no 'basicmotions' subfolder" + (": it is the basicmotions folder itself" if inside else ""),
            value=f"basicmotions:{location}",
            fix=(f"pass its parent folder, data='basicmotions:{parent}'" if inside else "pass the folder that holds basicmotions/")
            + " (ROOT must hold basicmotions/BasicMotions_TRAIN.ts and basicmotions/BasicMotions_TEST.ts, as shared/data does)",
        )
    train, test = load_basicmotions(root)
    if train.class_names != test.class_names:
        raise DataError(root, f"train and test declare different classes {train.class_names} vs {test.class_names}", fix="use the original files")
    length = sensor_length or train.values.shape[2]  # auto: the files' own length
    if length != train.values.shape[2]:
        if length < train.values.shape[2]:
            logging.getLogger(__name__).warning(
                "BasicMotions series have %d steps; sensor-length=%d cuts every one. Fix: sensor-length=auto", train.values.shape[2], length,
            )
        train, test = (SensorSeries(_fit(s.values, length), s.labels, s.class_names) for s in (train, test))
    schema = Schema(
        tuple(Modality(n, ModalityKind.SENSOR, (s.stop - s.start, length), "series") for n, s in BASICMOTIONS_MODALITIES.items()),
        train.class_names,
    )

    def dataset(series: SensorSeries, split: str) -> MultimodalDataset:
        n = series.values.shape[0]
        return MultimodalDataset(
            schema, {m: np.ascontiguousarray(series.values[:, s]) for m, s in BASICMOTIONS_MODALITIES.items()},
            np.ones((n, len(schema.modalities)), dtype=bool), series.label_ids, {}, tuple(f"{split}-{i}" for i in range(n)),
        )

    return Source("basicmotions", dataset(train, "train"), dataset(test, "test"), None)


def _fit(values: np.ndarray, length: int) -> np.ndarray:
    """Series ``[N, C, T]`` cut or zero-padded to ``length`` steps."""
    out = np.zeros((*values.shape[:2], length), np.float32)
    n = min(length, values.shape[2])
    out[:, :, :n] = values[:, :, :n]
    return out


def _manifest(path: Path, prep: Preprocessing, classes: tuple[str, ...], lenient: bool, test_fraction: float, roots: tuple[str, ...]) -> Source:
    from fedmm.data.manifest import load_manifest_report

    report = load_manifest_report(path, prep, classes=classes, lenient=lenient, roots=roots)
    rows = report.dataset
    assert rows is not None
    if "split" in rows.groups and (rows.groups["split"] == "test").any():
        test_rows = rows.groups["split"] == "test"
    elif report.declares_test:
        # The manifest named its test rows and lenient loading skipped them all: hold out no training row
        # in their place (require_test says why there is no test set).
        test_rows = np.zeros(len(rows), dtype=bool)
    else:
        # No test rows: hold out a seeded fraction for the server's evaluation (none at a deployed site).
        rng = np.random.default_rng(0)
        test_rows = np.zeros(len(rows), dtype=bool)
        test_rows[rng.permutation(len(rows))[: int(round(test_fraction * len(rows)))]] = True
    pool = rows.subset(np.flatnonzero(~test_rows))
    test = rows.subset(np.flatnonzero(test_rows)) if test_rows.any() else None
    return Source("manifest", pool, test, "site" if "site" in rows.groups else None, report.skipped_by_site, report.skipped_test)
