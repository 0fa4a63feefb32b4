"""Audio loading and features for spoken-digit recordings.

Reading uses ``soundfile`` (WAV and lossless FLAC); features use ``librosa``'s
mel spectrogram. Each clip is standardised on its own, so no statistic ever
crosses from one site to another.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from fedmm.data.wavheader import wav_truncation
from fedmm.errors import DataError

__all__ = ["CLIP_SAMPLES", "LOG_MEL_PARAMS", "N_MELS", "SAMPLE_RATE", "log_mel", "read_clip"]

SAMPLE_RATE = 8_000
CLIP_SAMPLES = SAMPLE_RATE  # one second: FSDD's 99th percentile length is 0.93 s
N_FFT = 256
HOP_LENGTH = 128
N_MELS = 32


def read_clip(path: str | Path, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a mono clip as float32 in [-1, 1], padded or trimmed to one second.

    Raises
    ------
    DataError
        If the file is missing, undecodable or truncated, not mono, or recorded at another rate.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "audio file not found", fix="check the recordings folder")
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise DataError(path, f"cannot decode audio ({err})", fix="replace the corrupt file, or remove it") from err
    if rate != sample_rate:
        raise DataError(
            path, f"sample rate is {rate} Hz, expected {sample_rate} Hz",
            fix=f"resample the file to {sample_rate} Hz (e.g. sox in.wav -r {sample_rate} out.wav)",
        )
    truncated = wav_truncation(path)  # libsndfile would read a truncated WAV as a short clip, padded silently
    if truncated is not None:
        raise DataError(
            path, f"is truncated: its header says {truncated[0]} frames, the file holds {truncated[1]}",
            fix="copy the recording again from the original data (an interrupted copy?), or remove it",
        )
    if samples.shape[1] != 1:
        raise DataError(path, f"has {samples.shape[1]} channels, expected mono", fix="mix it down to one channel")
    if samples.shape[0] == 0:
        raise DataError(path, "holds no samples", fix="replace or remove the empty recording")
    clip = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    n = min(CLIP_SAMPLES, samples.shape[0])
    clip[:n] = samples[:n, 0]
    return clip


def log_mel(clips: np.ndarray) -> np.ndarray:
    """Turn clips ``[N, CLIP_SAMPLES]`` into standardised log-mel maps ``[N, 1, N_MELS, frames]``."""
    mel = librosa.feature.melspectrogram(
        y=np.asarray(clips, dtype=np.float32), sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=N_MELS
    )
    logmel = np.log(mel + 1e-6)
    mean = logmel.mean(axis=(-2, -1), keepdims=True)
    std = logmel.std(axis=(-2, -1), keepdims=True) + 1e-6
    return ((logmel - mean) / std)[:, None].astype(np.float32)


def _source_digest(function: object) -> str:
    try:
        return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]  # type: ignore[arg-type]
    except (OSError, TypeError):
        return "unknown"


# Everything that shapes log_mel's output, for fedmm.data.cache's key: a change to any of them
# (its code included) makes a new cache entry rather than serving an old one.
LOG_MEL_PARAMS = {
    "sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop_length": HOP_LENGTH, "n_mels": N_MELS,
    "librosa": importlib.metadata.version("librosa"), "numpy": np.__version__, "code": _source_digest(log_mel),
}
