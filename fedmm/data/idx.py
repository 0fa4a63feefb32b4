"""Reader and writer for the IDX format of the original MNIST files (optionally gzipped).

IDX (LeCun et al.): a 4-byte magic number ``0x0000TTDD`` (TT: element type,
DD: number of dimensions), one big-endian uint32 per dimension, then the data.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from fedmm.errors import DataError

__all__ = ["read_idx", "write_idx"]

_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read a uint8 IDX file (``.gz`` or plain) into an array of its declared shape.

    Raises
    ------
    DataError
        If the file is missing, not gzip when named ``.gz``, truncated, or not uint8 IDX.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found", fix="the data root (avmnist:ROOT) must hold mnist/t10k-images-idx3-ubyte.gz and mnist/t10k-labels-idx1-ubyte.gz, as shared/data does")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(path, f"cannot decompress ({err})", fix="re-download or re-copy the file; it is corrupt") from err
    if len(raw) < 4:
        raise DataError(path, f"too short for an IDX header ({len(raw)} bytes)", fix="replace the corrupt file")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _UBYTE or ndim == 0:
        raise DataError(
            path, f"not a uint8 IDX file (magic 0x{raw[:4].hex()})",
            fix="expected the original MNIST idx1/idx3 ubyte files",
        )
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            path, f"holds {len(raw) - header} data bytes but its header declares shape {shape} ({expected} bytes)",
            fix="the file is truncated or corrupt: replace it",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(">HBB", 0, _UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
