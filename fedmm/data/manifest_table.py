"""Reading a manifest's table: its header, checked, and its rows, numbered as a spreadsheet numbers them.

A CSV is read with Python's :mod:`csv` module, record by record: row 1 is the header, a
blank line is a row (as a spreadsheet shows it) that holds no sample, and a quoted cell over
several lines is one row. A Parquet file's rows are numbered from 2 in the same way.

The header is checked before any row is read, and an error about a file that is not a valid
manifest never quotes it: a site asked to load ``/etc/secret.txt`` as a manifest answers
"its first line has 2 fields", not the line. Header text is named in errors only once the
header is valid (the column names then become the model's modality names anyway). Paths
and values go to the error's local ``detail`` (see :class:`~fedmm.errors.DataError`).
"""

from __future__ import annotations

import csv
import difflib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fedmm.data.schema import ModalityKind
from fedmm.errors import DataError

__all__ = ["RESERVED", "ManifestColumns", "TableRow", "ManifestTable", "read_manifest_table", "write_manifest", "WHERE"]

RESERVED = ("label", "site", "split")
WHERE = "manifest"  # how an error names the manifest in what a site may send: never its path
_FORMATS = {".csv": ",", ".txt": ",", ".tsv": "\t", ".parquet": ""}


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
        """Sort the header's names; ``where`` (the manifest's path) only goes to errors' detail."""
        kinds = {k.value: k for k in ModalityKind}
        modalities: list[tuple[str, ModalityKind]] = []
        tabular, meta = [], []
        local = f"manifest {where}"
        if "label" not in columns:
            # Quoted (locally) only when evidently a manifest's header, not another file's first line.
            near = [c for c in columns if c.strip().lower() == "label"]
            hint = f"; its header has {near[0]!r}: column names are lower case, rename it 'label'" if near else ""
            if not near and len(columns) == 1 and any(sep in columns[0] for sep in ";\t|") and "label" in columns[0].lower():
                hint = "; its header looks separated by " + next(repr(sep) for sep in ";\t|" if sep in columns[0]) + ", not commas: save it as comma-separated CSV"
            raise DataError(
                WHERE, f"is not a CSV/Parquet manifest with a 'label' column: its first line has {len(columns)} fields",
                fix="pass the site's manifest, whose header names a 'label' column (see docs/data.md)", detail=local + hint,
            )
        for number, col in enumerate(columns, start=1):
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
                # quoted, even locally, only when it is evidently a misspelt column name, not another file's first line
                named = f"unknown column {col!r}, did you mean '{close[0]}'?" if close and len(col) <= 64 else "no known column name is close"
                raise DataError(
                    WHERE, f"column {number} of the header is not a known column name",
                    fix=f"Columns are {', '.join(known)} (KIND:NAME for several of one kind); put other information in 'meta:NAME'",
                    detail=f"{named}; {local}",
                )
        twice = sorted(name for name, n in Counter(columns).items() if n > 1)
        if twice:
            raise DataError(WHERE, f"the header names column {twice[0]!r} twice", fix="rename or remove one of them", detail=local)
        if not modalities and not tabular:
            raise DataError(WHERE, "has no modality column", fix="add at least one of image, audio, text, sensor or tabular:NAME", detail=local)
        return cls(tuple(modalities), tuple(tabular), tuple(meta), "site" in columns, "split" in columns)


@dataclass(frozen=True)
class TableRow:
    """One row: its number as a spreadsheet shows it (the header is row 1), its cells
    (stripped; '' for an empty or absent cell) and how many cells it had in all."""

    number: int
    cells: dict[str, str]
    width: int


@dataclass(frozen=True)
class ManifestTable:
    names: tuple[str, ...]
    columns: ManifestColumns
    rows: tuple[TableRow, ...]


def read_manifest_table(path: Path) -> ManifestTable:
    """Read a CSV (.csv, .txt), TSV or Parquet manifest: the header checked first, then the rows."""
    local = f"manifest {path}"
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _FORMATS)[:3]
        raise DataError(WHERE, "is a folder, not a manifest file", detail=local,
                        fix="pass the manifest file itself" + (f", e.g. {path.name}/{inside[0]} (the folder holds {', '.join(inside)})" if inside else ""))
    if not path.is_file():
        raise DataError(WHERE, "not found", fix="pass the path of a .csv or .parquet manifest", detail=local)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(WHERE, "is not a .csv, .tsv, .txt or .parquet file", fix="use a .csv or .parquet file", detail=local)
    table = _read_parquet(path) if suffix == ".parquet" else _read_csv(path, _FORMATS[suffix])
    if not table.rows:
        raise DataError(WHERE, "has no rows", fix="add one row a sample", detail=local)
    return table


def _read_csv(path: Path, separator: str) -> ManifestTable:
    local = f"manifest {path}"
    names: list[str] | None = None
    columns: ManifestColumns | None = None
    rows: list[TableRow] = []
    number = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            for number, record in enumerate(csv.reader(handle, delimiter=separator), start=1):
                if names is None:
                    if not record:
                        continue  # blank lines above the header
                    names = [name.strip() for name in record]
                    columns = ManifestColumns.parse(names, path)
                    continue
                if not record:
                    continue  # a blank line: a row of the spreadsheet, no sample
                cells = {name: (record[i].strip() if i < len(record) else "") for i, name in enumerate(names)}
                width = len(record) if any(c.strip() for c in record[len(names):]) else min(len(record), len(names))
                rows.append(TableRow(number, cells, width))
    except UnicodeDecodeError as err:
        raise DataError(
            WHERE, f"is not UTF-8 text (row {number + 1})", fix="save the manifest as UTF-8 CSV (or pass the manifest, not another file)",
            detail=f"{err.reason} at byte {err.start}; {local}",
        ) from None
    except csv.Error as err:
        raise DataError(WHERE, f"row {number + 1} cannot be read as CSV", fix="check its quotes and separators, or split very long cells", detail=f"{err}; {local}") from None
    except OSError as err:
        raise DataError(WHERE, "cannot be read", fix="check the file's permissions", detail=f"{err}; {local}") from None
    if names is None or columns is None:
        raise DataError(WHERE, "is empty", fix="write a header line and one row a sample", detail=local)
    return ManifestTable(tuple(names), columns, tuple(rows))


def _read_parquet(path: Path) -> ManifestTable:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except MemoryError:
        raise DataError(WHERE, "is too large to read", fix="split the manifest", detail=f"manifest {path}") from None
    except Exception as err:  # pyarrow's errors on a file that is not Parquet: named, never quoted to the server
        raise DataError(WHERE, "is not a readable Parquet file", fix="write it with pandas.DataFrame.to_parquet", detail=f"{err}; manifest {path}") from None
    names = [str(name).strip() for name in frame.columns]
    columns = ManifestColumns.parse(names, path)
    frame = frame.astype(object).where(frame.notna(), None)  # NaN, None, pd.NA and NaT: an empty cell
    rows = tuple(
        TableRow(number, {name: _cell(value) for name, value in zip(names, record)}, len(names))
        for number, record in enumerate(frame.itertuples(index=False, name=None), start=2)
    )
    return ManifestTable(tuple(names), columns, rows)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write rows (one dict a sample, columns as in :mod:`fedmm.data.manifest`) as a CSV manifest; return its path."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
