"""A manifest's sensor columns, judged from every row's ``.npy`` header before any row is loaded.

Only headers are read (:func:`~fedmm.data.decoders.npy_header`), so this costs a few bytes a
file. From them:

- the **reference channels** of each column: the channel count most of its series have (the
  earliest row's on a tie), so one odd file (saved ``[time, channels]``) is the row named,
  never the many rows that agree with each other;
- ``sensor-length=auto``: the longest series of the manifest, with a warning when it is far
  longer (:data:`LONG_FACTOR` times) than the median series, since every series of every
  sensor column is then padded to it;
- a warning when most series of a column have more channels than time steps (every file
  saved ``[time, channels]``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmm.data import checks
from fedmm.data.checks import SampleError
from fedmm.data.decoders import npy_header
from fedmm.data.manifest_table import TableRow
from fedmm.data.preprocess import Preprocessing

__all__ = ["LONG_FACTOR", "SensorColumn", "scan_sensors", "resolve_sensor_length", "layout_warnings"]

log = logging.getLogger(__name__)

LONG_FACTOR = 4  # sensor-length=auto warns when the longest series is this many times the median one
_NAMED = 5  # rows named in a warning (then "and N more")


@dataclass(frozen=True)
class SensorColumn:
    """What the headers of one sensor column declare: each row's shape, and the reference channels."""

    name: str
    shapes: dict[int, tuple[int, ...]]  # row number -> declared shape (rows whose header could be read)
    channels: int  # the most common channel count (1 when no header could be read)
    agreeing: int  # how many series have it

    @property
    def lengths(self) -> list[int]:
        return [shape[-1] for shape in self.shapes.values()]

    def mismatch(self, row: int, channels: int) -> tuple[str, str] | None:
        """(problem, fix) when a series of this column has other channels than the reference, else None."""
        if channels == self.channels:
            return None
        shape = self.shapes.get(row)
        problem = f"has {channels} channels" + (f" (array shape {shape})" if shape else "")
        problem += f", where {self.agreeing} of {len(self.shapes)} series of this column have {self.channels}"
        if shape is not None and len(shape) == 2 and shape[1] == self.channels:
            return problem + ": it looks saved as [time, channels]", "save it transposed, as [channels, time] (numpy.save(path, array.T)), or remove its row"
        return problem, f"save every series of this column as [channels, time] with {self.channels} channels, or remove its row"


def scan_sensors(rows: Sequence[TableRow], columns: Sequence[str], resolve: Callable[[str, TableRow, str], Path]) -> dict[str, SensorColumn]:
    """Read the header of every sensor cell; ``resolve(cell, row, column)`` gives the file (or raises SampleError)."""
    out = {}
    for col in columns:
        shapes: dict[int, tuple[int, ...]] = {}
        for row in rows:
            if row.cells[col]:
                try:
                    shape = npy_header(resolve(row.cells[col], row, col))[0]
                except (SampleError, OSError, ValueError):
                    continue  # a bad file is reported, with its row, when the rows are loaded
                if len(shape) in (1, 2) and 0 not in shape:
                    shapes[row.number] = shape
        counts = Counter(shape[0] if len(shape) == 2 else 1 for shape in shapes.values())  # first seen wins a tie
        channels, agreeing = counts.most_common(1)[0] if counts else (1, 0)
        out[col] = SensorColumn(col, shapes, channels, agreeing)
    return out


def resolve_sensor_length(prep: Preprocessing, scan: dict[str, SensorColumn], name: str) -> tuple[Preprocessing, list[str]]:
    """``prep`` with ``sensor-length=auto`` resolved to the longest series of the manifest, and
    warnings (for the caller to show) about a series far longer than the others. A cut
    (``sensor-length`` shorter than series) is logged here, for each column."""
    longest = max((n for col in scan.values() for n in col.lengths), default=0)
    warnings = []
    if prep.sensor_length is None:
        if longest > checks.MAX_SENSOR_LENGTH:
            log.warning("%s: the longest sensor series has %d steps, beyond the limit of %d: sensor-length=auto uses the limit", name, longest, checks.MAX_SENSOR_LENGTH)
        warnings += _long_series(scan, name, min(longest, checks.MAX_SENSOR_LENGTH))
        prep = dataclasses.replace(prep, sensor_length=min(max(longest, 4), checks.MAX_SENSOR_LENGTH))
    for col in scan.values():
        cut = [n for n in col.lengths if n > prep.sensor_length]  # type: ignore[operator]
        if cut:
            log.warning(
                "%s: %d of %d series of column %r are longer than sensor-length=%d and are cut to it (longest: %d steps). "
                "Fix: sensor-length=auto (the data's length) or sensor-length=%d", name, len(cut), len(col.lengths), col.name,
                prep.sensor_length, max(cut), min(max(cut), checks.MAX_SENSOR_LENGTH),
            )
    return prep, warnings


def _long_series(scan: dict[str, SensorColumn], name: str, length: int) -> list[str]:
    every = [(row, col.name, shape[-1]) for col in scan.values() for row, shape in col.shapes.items()]
    if not every:
        return []
    median = int(np.median([n for _, _, n in every]))
    long = sorted((row, col, n) for row, col, n in every if n > LONG_FACTOR * median)
    if not long:
        return []
    named = ", ".join(f"row {row} (column {col!r}, {n} steps)" for row, col, n in long[:_NAMED])
    more = f" and {len(long) - _NAMED} more" if len(long) > _NAMED else ""
    return [
        f"{name}: sensor-length=auto pads every series of every sensor column to {length} steps, for {len(long)} series far longer "
        f"than the median of {median} steps: {named}{more}; the other series become mostly zeros, and training slows {length / max(median, 1):.0f}x. "
        f"Fix: set sensor-length={median} (the median; longer series are cut), or shorten or remove those rows"
    ]


def layout_warnings(scan: dict[str, SensorColumn], name: str) -> list[str]:
    """A warning for each column whose series mostly have more channels than time steps (saved ``[time, channels]``?)."""
    out = []
    for col in scan.values():
        agreeing = [shape for shape in col.shapes.values() if len(shape) == 2 and shape[0] == col.channels]
        if agreeing and col.channels > int(np.median([shape[1] for shape in agreeing])):
            steps = int(np.median([shape[1] for shape in agreeing]))
            out.append(
                f"{name}: {len(agreeing)} of {len(col.shapes)} series of column {col.name!r} have more channels ({col.channels}) than time steps "
                f"({steps}): were they saved as [time, channels]? Fix: save each as [channels, time] (numpy.save(path, array.T))"
            )
    return out
