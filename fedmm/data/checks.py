"""What a loader refuses: the skip reasons, the row-level error, and the limits on a file's cost.

A site's files may be broken by accident or made by an attacker: a header can claim any size.
Every limit below is checked from a file's header *before* anything is decoded or allocated,
so a small file cannot claim gigabytes; a file beyond one is a bad row
(:class:`SampleError`), skipped and counted under ``--lenient``, like any other bad row.
The limits are module constants (documented in docs/data.md); change them here, or
monkeypatch them in a test.

===============================  ================================================================
:data:`MAX_IMAGE_PIXELS`         50 megapixels (an 8K frame is 33): width x height of a source
                                 image, from its header (Pillow's own limit, 89 MP, only warns)
:data:`MAX_IMAGE_SIZE`           1024: the largest ``image-size`` (side of the model input)
:data:`MAX_AUDIO_CHANNELS`       8 (7.1 surround); more is mixed down to mono otherwise
:data:`MIN_AUDIO_SECONDS`        0.02 s: a shorter recording holds no 16 ms analysis frame
:data:`MAX_RESAMPLE_RATIO`       32: the file's rate and ``audio-rate`` may differ by this factor
                                 (192 kHz to 8 kHz is 24); beyond it ``audio-resample`` refuses
:data:`MAX_AUDIO_RATE`           384 kHz: the highest sample rate a file may declare
:data:`MAX_SENSOR_CHANNELS`      1024 channels of a ``.npy`` series (high-density EEG has 256)
:data:`MAX_SENSOR_LENGTH`        100 000: the largest ``sensor-length``
===============================  ================================================================

Audio and sensor files are read only as far as the model input needs (``audio-seconds``,
``sensor-length``), so a long recording costs no more than a short one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmm.errors import DataError

__all__ = [
    "FLOAT32_MAX",
    "SkipReason",
    "SampleError",
    "file_error",
    "check_range",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIZE",
    "MAX_AUDIO_CHANNELS",
    "MIN_AUDIO_SECONDS",
    "MAX_RESAMPLE_RATIO",
    "MAX_AUDIO_RATE",
    "MAX_SENSOR_CHANNELS",
    "MAX_SENSOR_LENGTH",
    "MAX_TEXT_LENGTH",
]

FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e38: any larger magnitude becomes inf as a model input

MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_SIZE = 1024
MAX_AUDIO_CHANNELS = 8
MIN_AUDIO_SECONDS = 0.02
MAX_RESAMPLE_RATIO = 32
MAX_AUDIO_RATE = 384_000
MAX_SENSOR_CHANNELS = 1024
MAX_SENSOR_LENGTH = 100_000
MAX_TEXT_LENGTH = 4096


class SkipReason:
    """The reasons a sample can be rejected; lenient loading counts skips under these names."""

    MISSING_FILE = "missing file"
    OUTSIDE_FOLDER = "path outside the allowed folders"
    TOO_LARGE = "too large to load"
    UNDECODABLE_IMAGE = "undecodable image"
    UNDECODABLE_AUDIO = "undecodable audio"
    SAMPLE_RATE = "unexpected sample rate"
    EMPTY_AUDIO = "empty audio"
    SHORT_AUDIO = "audio too short"
    BAD_SENSOR = "unreadable sensor array"
    NON_FINITE = "NaN or infinite values"
    WRONG_SHAPE = "wrong shape"
    UNKNOWN_LABEL = "unknown label"
    MISSING_LABEL = "missing label"
    NO_MODALITY = "no modality present"
    BAD_NUMBER = "not a number"
    BAD_SPLIT = "bad split value"
    MISSING_SITE = "missing site"
    BAD_ROW = "wrong number of cells"


class SampleError(DataError):
    """One sample cannot be used; ``reason`` is one of :class:`SkipReason`.

    A manifest's row errors also carry ``row`` (as a spreadsheet numbers it), ``column`` and
    ``file`` (the cell, as written), for ``fedmm data check``'s list and CSV. ``str(err)``
    names neither the file nor a local path: those are in ``detail`` (see
    :class:`~fedmm.errors.DataError`).
    """

    def __init__(
        self, path: object, problem: str, *, reason: str, fix: str = "", detail: str = "",
        row: int | None = None, column: str | None = None, file: str | None = None,
    ) -> None:
        self.reason = reason
        self.row = row
        self.column = column
        self.file = file
        super().__init__(path, problem, fix=fix, detail=detail)


def file_error(path: Path, problem: str, *, reason: str, fix: str, cause: object = None) -> SampleError:
    """A loader's error about one file: its name in the message, its full path (and the
    decoder's own words, which may quote the path or the file's bytes) only in the detail."""
    detail = str(path) + (f": {type(cause).__name__}: {cause}" if cause is not None else "")
    return SampleError(path.name, problem, reason=reason, fix=fix, detail=detail)


def check_range(values: np.ndarray, path: Path, what: str, *, fix: str) -> None:
    """Refuse finite values that float32 cannot hold (the cast to a model input would make them inf)."""
    if np.issubdtype(values.dtype, np.integer):
        return  # every int64 is within float32's range
    outside = np.abs(values) > FLOAT32_MAX
    if outside.any():
        largest = float(np.abs(values).max())
        raise file_error(
            path, f"holds {int(outside.sum())} {what} beyond float32's range (largest magnitude {largest:.6g} > {FLOAT32_MAX:.8g})",
            reason=SkipReason.NON_FINITE, fix=fix,
        )
