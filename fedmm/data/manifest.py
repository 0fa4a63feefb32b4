"""Manifests: a site's own multimodal data, described in one CSV or Parquet file.

One row is one sample. Columns (paths are relative to the manifest's folder):

============================  =====================================================
``image``, ``image:NAME``     path to an image Pillow reads (PNG, JPEG, ...)
``audio``, ``audio:NAME``     path to a WAV/FLAC/OGG recording
``text``, ``text:NAME``       the text itself
``sensor``, ``sensor:NAME``   path to a ``.npy`` array ``[channels, time]``
``tabular:NAME``              a number; all ``tabular:*`` columns form one modality
``label``                     the class name (required)
``site``                      optional: which site holds the row (natural partition)
``split``                     optional: ``train`` or ``test``
``meta:NAME``                 optional: anything else (e.g. ``meta:subject``), kept as a group
============================  =====================================================

Several columns of one kind (``image:front``, ``image:side``) are separate
modalities. An empty cell means that sample lacks that modality: it travels as a
``False`` in the presence mask. Any other column name is refused, with the
closest known name.

Strict loading (the default) stops at the first bad row, naming the row, the
column and the file. Lenient loading skips bad rows and counts them per reason
(:class:`~fedmm.data.preprocess.SkipReason`); nothing is dropped silently. A number
(tabular cell, sensor or audio value) that is not finite, or beyond float32's range
(about 3.4e38, which a model input cannot hold), is a bad row. Training bounds every
input to +-1e6 (:data:`fedmm.models.evaluation.INPUT_BOUND`), with a warning: rescale
tabular columns whose raw values go beyond that.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmm.data.preprocess import (
    FLOAT32_MAX,
    Preprocessing,
    SampleError,
    SkipReason,
    audio_features,
    load_audio,
    load_image,
    load_sensor,
    sentence_embeddings,
    tokenize,
)
from fedmm.data.schema import Modality, ModalityKind, MultimodalDataset, Schema
from fedmm.errors import DataError

__all__ = ["ManifestColumns", "read_manifest_table", "write_manifest", "load_manifest", "RESERVED"]

RESERVED = ("label", "site", "split")
_PATH_KINDS = (ModalityKind.IMAGE, ModalityKind.AUDIO, ModalityKind.SENSOR)


@dataclass(frozen=True)
class ManifestColumns:
    """The manifest's columns sorted into modalities, tabular features and metadata."""

    modalities: tuple[tuple[str, ModalityKind], ...]  # (column, kind), tabular excluded
    tabular: tuple[str, ...]
    meta: tuple[str, ...]
    has_site: bool
    has_split: bool

    @classmethod
    def parse(cls, columns: list[str], where: Path) -> ManifestColumns:
        kinds = {k.value: k for k in ModalityKind}
        modalities: list[tuple[str, ModalityKind]] = []
        tabular, meta = [], []
        if "label" not in columns:
            raise DataError(where, f"has no 'label' column (columns: {', '.join(columns)})", fix="add a 'label' column with each row's class name")
        for col in columns:
            prefix, sep, rest = col.partition(":")
            if col in RESERVED:
                continue
            if prefix == "meta" and sep and rest:
                meta.append(col)
            elif prefix == "tabular" and sep and rest:
                tabular.append(col)
            elif prefix in kinds and prefix != "tabular" and (not sep or rest):
                modalities.append((col, kinds[prefix]))
            else:
                known = [*RESERVED, *(k.value for k in ModalityKind if k is not ModalityKind.TABULAR), "tabular:NAME", "meta:NAME"]
                close = difflib.get_close_matches(prefix, [*RESERVED, *kinds], n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise DataError(
                    where, f"unknown column {col!r}",
                    fix=f"{hint}Columns are {', '.join(known)} (KIND:NAME for several of one kind); put other information in 'meta:NAME'",
                )
        if not modalities and not tabular:
            raise DataError(where, "has no modality column", fix="add at least one of image, audio, text, sensor or tabular:NAME")
        return cls(tuple(modalities), tuple(tabular), tuple(meta), "site" in columns, "split" in columns)


def read_manifest_table(path: Path) -> list[dict[str, str]]:
    """Read a CSV or Parquet manifest as rows of strings ('' for an empty cell)."""
    import pandas as pd

    if not path.is_file():
        raise DataError(path, "manifest not found", fix="pass the path of a .csv or .parquet manifest")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        else:
            raise DataError(path, f"unknown manifest format {path.suffix!r}", fix="use a .csv or .parquet file")
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(path, f"cannot parse the manifest ({err})", fix="check it opens as a table (quotes, separators)") from err
    rows = []
    for record in frame.to_dict(orient="records"):
        rows.append({str(k): _cell(v) for k, v in record.items()})
    if not rows:
        raise DataError(path, "has no rows", fix="add one row a sample")
    return rows


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write rows (one dict a sample, columns as above) as a CSV manifest; return its path."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def load_manifest(path: str | Path, prep: Preprocessing, *, classes: tuple[str, ...] = (), lenient: bool = False) -> MultimodalDataset:
    """Load every row of a manifest into one :class:`MultimodalDataset`.

    ``classes`` fixes the class list (a label outside it is bad input); empty means the
    sorted labels found. Groups carry ``site``, ``split`` and ``meta:*`` columns.

    Raises
    ------
    DataError
        Strict mode: the first bad row (row number as in a spreadsheet, column, file, fix).
        Both modes: a bad header, an empty modality column, or no usable row.
    """
    return _load_manifest(Path(path).expanduser().resolve(), prep, tuple(classes), lenient)


@functools.lru_cache(maxsize=4)
def _load_manifest(path: Path, prep: Preprocessing, classes: tuple[str, ...], lenient: bool) -> MultimodalDataset:
    rows = read_manifest_table(path)
    cols = ManifestColumns.parse(list(rows[0]), path)
    folder = path.parent
    skipped: Counter[str] = Counter()

    for col, _ in cols.modalities:
        if all(not r[col] for r in rows):
            raise DataError(path, f"column {col!r} is empty in every row", fix="fill it or remove the column")
    for col in cols.tabular:
        if all(not r[col] for r in rows):
            raise DataError(path, f"column {col!r} is empty in every row", fix="fill it or remove the column")
    labels_found = sorted({r["label"] for r in rows if r["label"]})
    class_list = classes or tuple(labels_found)
    if not class_list:
        raise DataError(path, "no row has a label", fix="fill the 'label' column")
    class_index = {c: i for i, c in enumerate(class_list)}

    # channels of each sensor column, fixed by the first *accepted* row that has it (and that row)
    sensor_channels: dict[str, tuple[int, str] | None] = {col: None for col, kind in cols.modalities if kind is ModalityKind.SENSOR}
    kept: list[dict[str, object]] = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header, as a spreadsheet shows it
        where = f"{path}: row {number}"
        try:
            kept.append(_load_row(row, cols, folder, prep, class_index, sensor_channels, where))
        except SampleError as err:
            if not lenient:
                raise
            skipped[err.reason] += 1
    if not kept:
        raise DataError(path, f"no usable row ({dict(skipped)} skipped)", fix="fix the rows listed by `fedmm data check`")

    modalities: list[Modality] = []
    features: dict[str, np.ndarray] = {}
    present_cols = []
    for col, kind in cols.modalities:
        present = np.array([sample[col] is not None for sample in kept])
        if kind is ModalityKind.SENSOR:
            fixed = sensor_channels[col]
            m = prep.modality(col, kind, channels=fixed[0] if fixed else 1)
        else:
            m = prep.modality(col, kind)
        if kind is ModalityKind.TEXT:
            texts = [str(sample[col]) if sample[col] is not None else "" for sample in kept]
            if m.representation == "embedding":
                values = sentence_embeddings(texts)
            else:
                values = np.stack([tokenize(t, prep) for t in texts])
        elif kind is ModalityKind.AUDIO:
            clips = np.zeros((len(kept), prep.clip_samples), np.float32)
            for i, sample in enumerate(kept):
                if sample[col] is not None:
                    clips[i] = sample[col]  # type: ignore[call-overload]
            values = audio_features(clips, prep)
        else:
            values = np.zeros((len(kept), *m.shape), dtype=m.dtype)
            for i, sample in enumerate(kept):
                if sample[col] is not None:
                    values[i] = sample[col]
        values[~present] = 0
        modalities.append(m)
        features[col] = values
        present_cols.append(present)
    if cols.tabular:
        m = prep.modality("tabular", ModalityKind.TABULAR, width=len(cols.tabular))
        present = np.array([sample["tabular"] is not None for sample in kept])
        values = np.zeros((len(kept), len(cols.tabular)), np.float32)
        for i, sample in enumerate(kept):
            if sample["tabular"] is not None:
                values[i] = sample["tabular"]
        modalities.append(m)
        features["tabular"] = values
        present_cols.append(present)
    groups = {name: np.array([str(s["groups"][name]) for s in kept]) for name in _group_names(cols)}  # type: ignore[index]
    return MultimodalDataset(
        Schema(tuple(modalities), class_list), features, np.stack(present_cols, axis=1),
        np.array([s["label"] for s in kept], dtype=np.int64), groups, tuple(str(s["id"]) for s in kept), dict(skipped),
    )


def _group_names(cols: ManifestColumns) -> list[str]:
    return (["site"] if cols.has_site else []) + (["split"] if cols.has_split else []) + list(cols.meta)


def _load_row(
    row: dict[str, str], cols: ManifestColumns, folder: Path, prep: Preprocessing,
    class_index: dict[str, int], sensor_channels: dict[str, tuple[int, str] | None], where: str,
) -> dict[str, object]:
    label = row["label"]
    if not label:
        raise SampleError(where, "has no label", reason=SkipReason.MISSING_LABEL, fix="fill the 'label' cell, or remove the row")
    if label not in class_index:
        raise SampleError(
            where, f"label {label!r} is not one of the classes {list(class_index)}", reason=SkipReason.UNKNOWN_LABEL,
            fix="correct the label, or add it to the run config's 'classes'",
        )
    if cols.has_split and row["split"] not in ("", "train", "test"):
        raise SampleError(where, f"split {row['split']!r} is neither 'train' nor 'test'", reason=SkipReason.BAD_SPLIT, fix="use train or test, or leave it empty (train)")
    sample: dict[str, object] = {"label": class_index[label], "id": where.rsplit(": ", 1)[1]}
    anything = False
    for col, kind in cols.modalities:
        cell = row[col]
        if not cell:
            sample[col] = None
            continue
        anything = True
        try:
            if kind is ModalityKind.IMAGE:
                sample[col] = load_image(folder / cell, prep)
            elif kind is ModalityKind.AUDIO:
                sample[col] = load_audio(folder / cell, prep)
            elif kind is ModalityKind.SENSOR:
                fixed = sensor_channels[col]
                series = load_sensor(
                    folder / cell, prep, channels=fixed[0] if fixed else None,
                    set_by=f"the first accepted row ({fixed[1]}) has" if fixed else "",
                )
                sample[col] = series
            else:
                sample[col] = cell  # tokenized or embedded for all rows at once, below
        except SampleError as err:
            raise SampleError(f"{where}, column {col!r}, {err.path}", err.problem, reason=err.reason, fix=err.fix) from err
    if cols.tabular:
        cells = [row[c] for c in cols.tabular]
        if not any(cells):
            sample["tabular"] = None
        else:
            values = []
            for c, text in zip(cols.tabular, cells):
                try:
                    value = float(text)
                except ValueError:
                    raise SampleError(
                        f"{where}, column {c!r}", f"{text!r} is not a number" if text else "is empty while other tabular cells are filled",
                        reason=SkipReason.BAD_NUMBER, fix="write a number, or leave every tabular cell of the row empty to mark the modality missing",
                    ) from None
                if not math.isfinite(value):
                    raise SampleError(f"{where}, column {c!r}", f"value {text!r} is not finite", reason=SkipReason.NON_FINITE, fix="write a finite number")
                if abs(value) > FLOAT32_MAX:  # finite here, inf once a float32 model input
                    raise SampleError(
                        f"{where}, column {c!r}", f"value {text!r} is beyond float32's range (|x| <= {FLOAT32_MAX:.8g})",
                        reason=SkipReason.NON_FINITE, fix="rescale the column (e.g. other units), or leave the row's tabular cells empty",
                    )
                values.append(value)
            sample["tabular"] = np.array(values, np.float32)
            anything = True
    if not anything:
        raise SampleError(where, "has no modality (every modality cell is empty)", reason=SkipReason.NO_MODALITY, fix="fill at least one modality, or remove the row")
    if cols.has_site and not row["site"]:
        raise SampleError(where, "has an empty 'site' cell", reason=SkipReason.MISSING_SITE, fix="name the site that holds the row")
    for col, kind in cols.modalities:  # the row is accepted: it may fix a sensor column's channels
        if kind is ModalityKind.SENSOR and sample[col] is not None and sensor_channels[col] is None:
            sensor_channels[col] = (sample[col].shape[0], where.rsplit(": ", 1)[1])  # type: ignore[attr-defined]
    sample["groups"] = {name: row[name] for name in _group_names(cols)}
    return sample
