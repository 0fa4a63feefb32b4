"""Multichannel sensor time series: the sktime/UEA ``.ts`` text format and BasicMotions.

BasicMotions (UEA & UCR archive, Bagnall et al.): a smartwatch's 3-axis
accelerometer and 3-axis gyroscope, 100 steps at 10 Hz, four activities
(Standing, Running, Walking, Badminton), 40 training and 40 test series. fedmm
reads it as two sensor modalities: ``accelerometer`` (channels 0-2) and
``gyroscope`` (channels 3-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmm.data.checks import FLOAT32_MAX
from fedmm.errors import DataError

__all__ = ["SensorSeries", "read_ts", "load_basicmotions", "BASICMOTIONS_MODALITIES"]

BASICMOTIONS_MODALITIES: dict[str, slice] = {"accelerometer": slice(0, 3), "gyroscope": slice(3, 6)}


@dataclass(frozen=True)
class SensorSeries:
    """Equal-length multichannel series with string class labels."""

    values: np.ndarray  # float32 [N, channels, length]
    labels: tuple[str, ...]
    class_names: tuple[str, ...]  # as declared by @classLabel, in that order

    @property
    def label_ids(self) -> np.ndarray:
        """Labels as indices into ``class_names``."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return np.array([index[label] for label in self.labels], dtype=np.int64)


def read_ts(path: str | Path) -> SensorSeries:
    """Read an equal-length, labelled ``.ts`` file.

    Raises
    ------
    DataError
        Naming the file and line: a missing header or ``@data``, a line whose
        dimension count or length differs from the header, a value that is not a
        finite number or is beyond float32's range (the series are float32), or a
        label not declared in ``@classLabel``. The message names the file by its name;
        its path and the line's values are in the error's ``detail`` only.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path.name, "file not found", fix="the data root (basicmotions:ROOT) must hold basicmotions/BasicMotions_TRAIN.ts and basicmotions/BasicMotions_TEST.ts, as shared/data does: pass the basicmotions folder's parent", detail=str(path))
    header: dict[str, str] = {}
    rows: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path.name}:{number}"
            if not in_data:
                if line.lower() == "@data":
                    in_data = True
                    dims, length, names = _check_header(path, header)
                elif line.startswith("@"):
                    key, _, value = line[1:].partition(" ")
                    header[key.lower()] = value.strip()
                else:
                    raise DataError(where, "data before the @data line", fix="put the header (@dimensions, @seriesLength, @classLabel) and @data first", detail=str(path))
                continue
            *channels, label = line.split(":")
            if len(channels) != dims:
                raise DataError(where, f"has {len(channels)} dimensions, the header declares {dims}", fix="fix or remove the line", detail=str(path))
            if label not in names:
                raise DataError(where, f"the label is not one of the {len(names)} declared in @classLabel", fix="declare it in @classLabel or fix the line",
                                detail=f"label {label!r}, declared {names}; {path}")
            series = np.empty((dims, length), dtype=np.float32)
            for channel, text in enumerate(channels):
                parts = text.split(",")
                if len(parts) != length:
                    raise DataError(where, f"dimension {channel} has {len(parts)} values, the header declares {length}", fix="fix or remove the line", detail=str(path))
                try:
                    values = [float(part) for part in parts]
                except ValueError as err:
                    raise DataError(where, f"dimension {channel} holds a value that is not a number", fix="fix the value", detail=f"{err}; {path}") from None
                if not all(math.isfinite(v) for v in values):
                    raise DataError(where, f"dimension {channel} holds NaN or infinite values", fix="impute or remove the series", detail=str(path))
                beyond = [v for v in values if abs(v) > FLOAT32_MAX]  # finite, but inf as float32
                if beyond:
                    raise DataError(
                        where, f"dimension {channel} holds {len(beyond)} value(s) beyond float32's range (e.g. {beyond[0]:g}; |x| <= {FLOAT32_MAX:.8g})",
                        fix="rescale or remove the series", detail=str(path),
                    )
                series[channel] = values
            rows.append(series)
            labels.append(label)
    if not in_data:
        raise DataError(path.name, "no @data line", fix="is this a .ts file? It needs a header and an @data section", detail=str(path))
    if not rows:
        raise DataError(path.name, "no series after @data", fix="add data or remove the file", detail=str(path))
    return SensorSeries(np.stack(rows), tuple(labels), names)


def _check_header(path: Path, header: dict[str, str]) -> tuple[int, int, tuple[str, ...]]:
    if header.get("equallength", "true").lower() != "true":
        raise DataError(path.name, "series of unequal length are not supported", fix="resample or pad the series to one length", detail=str(path))
    try:
        dims = int(header.get("dimensions", "1"))
        length = int(header["serieslength"])
    except (KeyError, ValueError) as err:
        raise DataError(path.name, "header needs integer @dimensions and @seriesLength", fix="add them to the header", detail=f"{err!r}; {path}") from None
    label_spec = header.get("classlabel", "").split()
    if not label_spec or label_spec[0].lower() != "true" or len(label_spec) < 2:
        raise DataError(path.name, "header must declare '@classLabel true <names...>'", fix="list the class names in the header", detail=str(path))
    return dims, length, tuple(label_spec[1:])


def load_basicmotions(root: str | Path) -> tuple[SensorSeries, SensorSeries]:
    """Read BasicMotions' train and test splits from ``ROOT/basicmotions/``."""
    folder = Path(root) / "basicmotions"
    return read_ts(folder / "BasicMotions_TRAIN.ts"), read_ts(folder / "BasicMotions_TEST.ts")
