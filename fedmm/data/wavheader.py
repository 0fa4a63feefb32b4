"""What a WAV file's header promises, to catch a truncated recording that libsndfile would pad silently.

libsndfile clamps a WAV's frame count to what the file holds, so a recording cut short (an
interrupted copy or export) decodes as a short clip and would be zero-padded to
``audio-seconds`` without a word. :func:`wav_truncation` reads the RIFF chunks (the header
only, never the samples) and compares the ``data`` chunk's declared size with the bytes that
follow it. A streaming writer's placeholder size (0 or 0xFFFFFFFF) and RF64 files say nothing
and are not judged. FLAC and OGG keep their length in their own headers; soundfile reads
fewer frames than promised there, which :func:`fedmm.data.decoders.load_audio` checks.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["wav_truncation"]

_UNKNOWN_SIZES = (0, 0xFFFFFFFF)
_MAX_CHUNKS = 64  # chunks before ``data`` (fmt, LIST, fact, ...): a real file has a handful


def wav_truncation(path: Path) -> tuple[int, int] | None:
    """``(frames the header declares, frames the file holds)`` when a RIFF/WAVE file is
    truncated, else None (complete, not a RIFF/WAVE file, or a size the header leaves open)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = 0
            for _ in range(_MAX_CHUNKS):
                chunk = handle.read(8)
                if len(chunk) < 8:
                    return None
                kind, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                start = handle.tell()
                if kind == b"fmt ":
                    fmt = handle.read(min(length, 16))
                    if len(fmt) >= 14:
                        block_align = struct.unpack("<H", fmt[12:14])[0]
                elif kind == b"data":
                    if length in _UNKNOWN_SIZES or block_align == 0:
                        return None
                    held = size - start
                    if length <= held:
                        return None
                    return length // block_align, held // block_align
                handle.seek(start + length + (length & 1))  # chunks are padded to an even size
    except OSError:
        return None  # unreadable: the decoder reports it
    return None
