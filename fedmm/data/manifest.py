"""Manifests: a site's own multimodal data, described in one CSV or Parquet file.

One row is one sample. Columns (paths are relative to the manifest's folder, and must stay
inside it, symbolic links followed, unless the caller allows other ``roots``):

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

Strict loading (the default) stops at the first bad row, naming the row (as a
spreadsheet numbers it: the header is row 1, blank lines count), the column and the file.
Lenient loading skips bad rows and counts them per reason
(:class:`~fedmm.data.checks.SkipReason`) and per site; nothing is dropped silently. A sensor
column's channels are those most of its files declare (:mod:`fedmm.data.manifest_sensors`),
and repeated files or train/test overlap are warned about (:mod:`fedmm.data.manifest_audit`).
:func:`check_manifest` (``fedmm data check``) collects every bad row instead of stopping.
An error's message names the row and column but no local path and no cell's value: those
are in its ``detail``, for the site's own log (see :class:`~fedmm.errors.DataError`).
Labels are compared in one canonical form (:mod:`fedmm.data.labels`). A number
(tabular cell, sensor or audio value) that is not finite, or beyond float32's range
(about 3.4e38, which a model input cannot hold), is a bad row. Training bounds every
input to +-1e6 (:data:`fedmm.models.evaluation.INPUT_BOUND`), with a warning: rescale
tabular columns whose raw values go beyond that.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmm.data.checks import FLOAT32_MAX, SampleError, SkipReason
from fedmm.data.decoders import load_audio, load_image, load_sensor
from fedmm.data.labels import canonical_classes, canonical_label, rare_lookalikes, spelling_notes
from fedmm.data.manifest_audit import RowFile, duplicate_warnings, skips_by_site
from fedmm.data.manifest_sensors import SensorColumn, layout_warnings, resolve_sensor_length, scan_sensors
from fedmm.data.manifest_table import RESERVED, WHERE, ManifestColumns, TableRow, read_manifest_table, write_manifest
from fedmm.data.preprocess import Preprocessing, audio_features, sentence_embeddings, tokenize
from fedmm.data.schema import Modality, ModalityKind, MultimodalDataset, Schema
from fedmm.errors import DataError

__all__ = [
    "ManifestColumns", "ManifestReport", "read_manifest_table", "write_manifest", "load_manifest", "load_manifest_report", "check_manifest",
    "RESERVED",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifestReport:
    """What :func:`check_manifest` found: the data (None when nothing is usable, or when strict
    loading found a bad row), every bad row in row order, notes (label spellings merged) and
    warnings (a site or the test set left with no row, files used twice or by both splits, an
    odd sensor layout or length). With lenient loading, skipped rows are also counted per site
    (training rows; only with a ``site`` column) and among the ``split=test`` rows."""

    dataset: MultimodalDataset | None
    problems: tuple[SampleError, ...]
    notes: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    skipped_by_site: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> reason -> training rows skipped
    skipped_test: dict[str, int] = field(default_factory=dict)  # reason -> split=test rows skipped
    declares_test: bool = False  # some row (kept or skipped) says split=test


def load_manifest(
    path: str | Path, prep: Preprocessing, *, classes: Sequence[str] = (), lenient: bool = False, roots: Sequence[str | Path] = (),
) -> MultimodalDataset:
    """Load every row of a manifest into one :class:`MultimodalDataset`.

    ``classes`` fixes the class list (a label outside it is bad input); empty means the
    sorted labels found. Groups carry ``site``, ``split`` and ``meta:*`` columns. File
    paths must resolve inside one of ``roots`` (default: the manifest's folder).

    Raises
    ------
    DataError
        Strict mode: the first bad row (row number as in a spreadsheet, column, fix; the
        file and the manifest's path in its ``detail``). Both modes: a bad header, an empty
        modality column, or no usable row.
    ConfigError
        When two of ``classes`` are one class, or one is a missing label's spelling.
    """
    dataset = load_manifest_report(path, prep, classes=classes, lenient=lenient, roots=roots).dataset
    assert dataset is not None
    return dataset


def load_manifest_report(
    path: str | Path, prep: Preprocessing, *, classes: Sequence[str] = (), lenient: bool = False, roots: Sequence[str | Path] = (),
) -> ManifestReport:
    """:func:`load_manifest`, with what the loader found besides the data (skips per site, warnings,
    logged here); the report's dataset is never None (raises as :func:`load_manifest` does)."""
    report = _load_manifest(*_arguments(path, classes, roots), prep, lenient, False)
    if report.dataset is None:
        skipped = dict(Counter(p.reason for p in report.problems))
        raise DataError(WHERE, f"has no usable row ({skipped} skipped)", fix="fix the rows listed by `fedmm data check`", detail=f"manifest {path}")
    return report


def check_manifest(
    path: str | Path, prep: Preprocessing, *, classes: Sequence[str] = (), lenient: bool = False, roots: Sequence[str | Path] = (),
) -> ManifestReport:
    """Load a manifest as :func:`load_manifest` does, but collect every bad row instead of
    stopping at the first (strict: then no dataset) or only counting them (lenient)."""
    return _load_manifest(*_arguments(path, classes, roots), prep, lenient, True)


def _arguments(path: str | Path, classes: Sequence[str], roots: Sequence[str | Path]) -> tuple[Path, tuple[str, ...], tuple[Path, ...]]:
    manifest = Path(path).expanduser().resolve()
    allowed = tuple(Path(r).expanduser().resolve() for r in roots) or (manifest.parent,)
    return manifest, canonical_classes(classes), allowed


@dataclass(frozen=True)
class _Context:
    path: Path
    roots: tuple[Path, ...]
    prep: Preprocessing
    cols: ManifestColumns
    class_index: dict[str, int]
    sensors: dict[str, SensorColumn] = field(default_factory=dict)  # what each sensor column's headers declare


@functools.lru_cache(maxsize=4)
def _load_manifest(
    path: Path, classes: tuple[str, ...], roots: tuple[Path, ...], prep: Preprocessing, lenient: bool, collect: bool,
) -> ManifestReport:
    table = read_manifest_table(path)
    cols, rows = table.columns, table.rows
    for col in [c for c, _ in cols.modalities] + list(cols.tabular):
        if all(not r.cells[col] for r in rows):
            raise DataError(WHERE, f"column {col!r} is empty in every row", fix="fill it or remove the column", detail=f"manifest {path}")
    spellings: dict[str, set[str]] = {}
    counts: Counter[str] = Counter()
    for r in rows:
        label = canonical_label(r.cells["label"])
        if label is not None:
            spellings.setdefault(label, set()).add(r.cells["label"])
            counts[label] += 1
    notes = spelling_notes(spellings) + (() if classes else rare_lookalikes(counts))
    for note in notes:
        log.warning("%s: %s", path, note)
    class_list = classes or tuple(sorted(spellings))
    if not class_list:
        raise DataError(WHERE, "no row has a label", fix="fill the 'label' column", detail=f"manifest {path}")
    # each sensor column's channels: the most common among its files' headers (not the first row's: it may be the odd one)
    scan_ctx = _Context(path, roots, prep, cols, {})
    sensors = scan_sensors(rows, [c for c, kind in cols.modalities if kind is ModalityKind.SENSOR], lambda cell, row, col: _inside(cell, scan_ctx, col, row))
    prep, warnings = resolve_sensor_length(prep, sensors, path.name)
    warnings += layout_warnings(sensors, path.name)
    ctx = _Context(path, roots, prep, cols, {c: i for i, c in enumerate(class_list)}, sensors)

    kept: list[dict[str, object]] = []
    problems: list[SampleError] = []
    for row in rows:
        try:
            kept.append(_load_row(row, ctx))
        except SampleError as err:
            if not (lenient or collect):
                raise
            problems.append(err.with_traceback(None))
    skips = skips_by_site(rows, problems, cols.has_site, path.name) if lenient else None
    warnings += [*duplicate_warnings(_row_files(kept), path.name, by_content=collect), *(skips.warnings if skips else ())]
    if not collect:  # `fedmm data check` prints them itself
        for warning in warnings:
            log.warning("%s", warning)
    if not kept or (problems and not lenient):
        return ManifestReport(None, tuple(problems), notes, tuple(warnings))
    skipped = dict(Counter(p.reason for p in problems))
    dataset = _dataset(kept, ctx, class_list, skipped)
    if skips is None:
        return ManifestReport(dataset, tuple(problems), notes, tuple(warnings))
    return ManifestReport(dataset, tuple(problems), notes, tuple(warnings), skips.by_site, skips.test, skips.declares_test)


def _row_files(kept: list[dict[str, object]]) -> list[RowFile]:
    out = []
    for sample in kept:
        groups, files, row = sample["groups"], sample["files"], sample["row"]
        assert isinstance(groups, dict) and isinstance(files, dict) and isinstance(row, int)
        split = "test" if groups.get("split") == "test" else "train"
        out += [RowFile(row, split, cell, file) for cell, file in files.items()]
    return out


def _dataset(kept: list[dict[str, object]], ctx: _Context, class_list: tuple[str, ...], skipped: dict[str, int]) -> MultimodalDataset:
    cols, prep = ctx.cols, ctx.prep
    modalities: list[Modality] = []
    features: dict[str, np.ndarray] = {}
    present_cols = []
    for col, kind in cols.modalities:
        present = np.array([sample[col] is not None for sample in kept])
        if kind is ModalityKind.SENSOR:
            m = prep.modality(col, kind, channels=ctx.sensors[col].channels)
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
        np.array([s["label"] for s in kept], dtype=np.int64), groups, tuple(str(s["id"]) for s in kept), skipped,
    )


def _group_names(cols: ManifestColumns) -> list[str]:
    return (["site"] if cols.has_site else []) + (["split"] if cols.has_split else []) + list(cols.meta)




def _row_error(row: TableRow, ctx: _Context, column: str | None, problem: str, *, reason: str, fix: str, detail: str = "", file: str | None = None) -> SampleError:
    """A bad row: row and column in the message; the file, cell values and paths only in the detail."""
    where = f"manifest row {row.number}" + (f", column {column!r}" if column else "")
    local = "; ".join(part for part in (f"file {file!r}" if file else "", detail, f"manifest {ctx.path}") if part)
    return SampleError(where, problem, reason=reason, fix=fix, detail=local, row=row.number, column=column, file=file)


def _inside(cell: str, ctx: _Context, column: str, row: TableRow) -> Path:
    """The cell's file, resolved (symbolic links followed), if it lies inside an allowed root."""
    try:
        resolved = (ctx.path.parent / cell).resolve()
    except (OSError, ValueError, RuntimeError) as err:  # a NUL byte, a name too long, a symlink loop
        raise _row_error(row, ctx, column, "the file's path cannot be resolved", reason=SkipReason.MISSING_FILE, file=cell,
                         detail=f"{type(err).__name__}: {err}", fix="write the file's path relative to the manifest's folder") from None
    if not any(resolved.is_relative_to(root) for root in ctx.roots):
        default = ctx.roots == (ctx.path.parent,)
        raise _row_error(
            row, ctx, column, "the file's path leads outside the " + ("manifest's folder" if default else "allowed folders"),
            reason=SkipReason.OUTSIDE_FOLDER, file=cell, detail=f"resolves to {resolved}; allowed: {', '.join(map(str, ctx.roots))}",
            fix="keep the files in the manifest's folder (paths relative to it, no '..', no links out), or allow their folder in the site's config",
        )
    return resolved


def _load_row(row: TableRow, ctx: _Context) -> dict[str, object]:
    cells, cols, prep = row.cells, ctx.cols, ctx.prep
    if row.width > len(cells):
        raise _row_error(row, ctx, None, f"has {row.width} cells, the header has {len(cells)}", reason=SkipReason.BAD_ROW,
                         fix="quote cells that hold the separator, or remove the extra cells")
    if row.width < len(cells):  # a line cut short (an interrupted copy): its last cell may be cut too, a site name say
        raise _row_error(row, ctx, None, f"has {row.width} cells, the header has {len(cells)}: it was cut short", reason=SkipReason.BAD_ROW,
                         fix="complete the row (an empty cell still needs its separator), or remove it")
    raw = cells["label"]
    label = canonical_label(raw)
    if label is None:
        raise _row_error(row, ctx, "label", "has no label", reason=SkipReason.MISSING_LABEL, detail=f"cell {raw!r}" if raw else "",
                         fix="fill the 'label' cell, or remove the row")
    if label not in ctx.class_index:
        shown = list(ctx.class_index)[:20]
        raise _row_error(
            row, ctx, "label", f"the label is not one of the {len(ctx.class_index)} classes {shown}" + (" ..." if len(ctx.class_index) > 20 else ""),
            reason=SkipReason.UNKNOWN_LABEL, detail=f"label {raw!r}", fix="correct the label, or add it to the run config's 'classes'",
        )
    if cols.has_split and cells["split"] not in ("", "train", "test"):
        raise _row_error(row, ctx, "split", "the split is neither 'train' nor 'test'", reason=SkipReason.BAD_SPLIT,
                         detail=f"cell {cells['split']!r}", fix="use train or test, or leave it empty (train)")
    files: dict[str, Path] = {}  # cell -> resolved file, for the duplicate check
    sample: dict[str, object] = {"label": ctx.class_index[label], "id": f"row {row.number}", "row": row.number, "files": files}
    anything = False
    for col, kind in cols.modalities:
        cell = cells[col]
        if not cell:
            sample[col] = None
            continue
        anything = True
        if kind is ModalityKind.TEXT:
            sample[col] = cell  # tokenized or embedded for all rows at once, by _dataset
            continue
        file = files[cell] = _inside(cell, ctx, col, row)
        try:
            if kind is ModalityKind.IMAGE:
                sample[col] = load_image(file, prep)
            elif kind is ModalityKind.AUDIO:
                sample[col] = load_audio(file, prep)
            else:  # its channels are compared with the column's once the row is otherwise accepted (below)
                sample[col] = load_sensor(file, prep, channels=None)
        except SampleError as err:
            raise _row_error(row, ctx, col, err.problem, reason=err.reason, fix=err.fix, file=cell, detail=err.detail) from None
        except MemoryError:
            raise _row_error(row, ctx, col, "cannot be loaded: out of memory", reason=SkipReason.TOO_LARGE, file=cell,
                             fix="make the file smaller (fewer pixels, a shorter recording), or remove its row") from None
    if cols.tabular:
        sample["tabular"] = _tabular(row, ctx)
        anything = anything or sample["tabular"] is not None
    if not anything:
        raise _row_error(row, ctx, None, "has no modality (every modality cell is empty)", reason=SkipReason.NO_MODALITY,
                         fix="fill at least one modality, or remove the row")
    if cols.has_site and not cells["site"]:
        raise _row_error(row, ctx, "site", "has an empty 'site' cell", reason=SkipReason.MISSING_SITE, fix="name the site that holds the row")
    for col, kind in cols.modalities:  # last, so that a row bad for another reason is counted under that reason
        if kind is ModalityKind.SENSOR and sample[col] is not None:
            odd = ctx.sensors[col].mismatch(row.number, sample[col].shape[0])  # type: ignore[attr-defined]
            if odd is not None:
                raise _row_error(row, ctx, col, odd[0], reason=SkipReason.WRONG_SHAPE, file=cells[col], fix=odd[1])
    sample["groups"] = {name: cells[name] for name in _group_names(cols)}
    return sample


def _tabular(row: TableRow, ctx: _Context) -> np.ndarray | None:
    texts = [row.cells[c] for c in ctx.cols.tabular]
    if not any(texts):
        return None
    values = []
    for c, text in zip(ctx.cols.tabular, texts):
        try:
            value = float(text)
        except ValueError:
            raise _row_error(
                row, ctx, c, "is not a number" if text else "is empty while other tabular cells are filled", reason=SkipReason.BAD_NUMBER,
                detail=f"cell {text!r}" if text else "", fix="write a number, or leave every tabular cell of the row empty to mark the modality missing",
            ) from None
        if not math.isfinite(value):
            raise _row_error(row, ctx, c, "the value is not finite", reason=SkipReason.NON_FINITE, detail=f"cell {text!r}", fix="write a finite number")
        if abs(value) > FLOAT32_MAX:  # finite here, inf once a float32 model input
            raise _row_error(
                row, ctx, c, f"the value is beyond float32's range (|x| <= {FLOAT32_MAX:.8g})", reason=SkipReason.NON_FINITE,
                detail=f"cell {text!r}", fix="rescale the column (e.g. other units), or leave the row's tabular cells empty",
            )
        values.append(value)
    return np.array(values, np.float32)
