"""Decoding one file of a sample: an image, a recording or a ``.npy`` sensor series.

Each loader checks the file's header against the limits of :mod:`fedmm.data.checks`
*before* decoding (a header can claim any size), reads only what the model input needs,
and turns every decoder failure, ``MemoryError`` included, into a
:class:`~fedmm.data.checks.SampleError` with a reason and a fix. The message names the
file; the full path and the decoder's own words (which may quote the file) are only in the
error's ``detail``.

- images: Pillow decodes, converts to grayscale (``L``) or ``RGB``, resizes, and scales to
  [-1, 1] with fixed constants (mean 0.5, std 0.5); 16-bit grayscale by its own range;
- audio: soundfile decodes (WAV, FLAC, OGG) the first ``audio-seconds``, multichannel is
  mixed down, librosa resamples (only when ``audio-resample`` allows it), and the clip is
  padded or trimmed to a fixed length; a file that holds fewer frames than its header says
  (truncated) is refused, as a truncated ``.npy`` is;
- sensors: ``.npy`` arrays ``[channels, time]`` (or ``[time]``), the first ``sensor-length``
  steps memory-mapped and copied, padded with zeros when shorter.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from fedmm.data import checks
from fedmm.data.checks import SampleError, SkipReason, check_range, file_error
from fedmm.data.preprocess import Preprocessing
from fedmm.data.wavheader import wav_truncation

__all__ = ["load_image", "load_audio", "load_sensor", "npy_header"]

_MISSING_FIX = "check the path (relative to the manifest's folder)"


def _is_file(path: Path) -> bool:
    """A regular file (not a folder, FIFO or device, which could block or never end), that can be looked at."""
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


# ---------------------------------------------------------------- images
def load_image(path: Path, prep: Preprocessing) -> np.ndarray:
    """Decode, convert, resize and scale one image: float32 ``[C, size, size]`` in [-1, 1]."""
    from PIL import Image

    if not _is_file(path):
        raise file_error(path, "image file not found", reason=SkipReason.MISSING_FILE, fix=_MISSING_FIX)
    if prep.image_size > checks.MAX_IMAGE_SIZE:  # Preprocessing refuses it too; never allocate it here
        raise file_error(path, f"image-size={prep.image_size} is beyond {checks.MAX_IMAGE_SIZE}", reason=SkipReason.TOO_LARGE, fix="set image-size <= 1024")
    undecodable = dict(reason=SkipReason.UNDECODABLE_IMAGE, fix="replace the corrupt file, or remove its row")
    try:
        with warnings.catch_warnings(record=True) as bombs:
            # Pillow warns from 89 MP, above fedmm's own limit: the warning is recorded (not hidden), and such an
            # image is refused just below with its size, by MAX_IMAGE_PIXELS.
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise file_error(path, "is an image beyond Pillow's decompression-bomb limit", reason=SkipReason.TOO_LARGE,
                         fix=_IMAGE_SIZE_FIX, cause=err) from None
    except MemoryError as err:
        raise file_error(path, "cannot be opened: out of memory", reason=SkipReason.TOO_LARGE, fix=_IMAGE_SIZE_FIX, cause=err) from None
    except Exception as err:  # any decoder failure on a hostile file is a bad row, named
        raise file_error(path, "cannot be decoded as an image (PNG, JPEG, ...)", cause=err, **undecodable) from None
    with img:
        width, height = img.size
        if width * height > checks.MAX_IMAGE_PIXELS or any(issubclass(w.category, Image.DecompressionBombWarning) for w in bombs):
            raise file_error(
                path, f"is {width}x{height} pixels ({width * height / 1e6:.0f} MP), beyond the limit of {checks.MAX_IMAGE_PIXELS / 1e6:.0f} MP",
                reason=SkipReason.TOO_LARGE, fix=_IMAGE_SIZE_FIX,
            )
        try:
            return _pixels(img, prep, path)
        except SampleError:
            raise
        except MemoryError as err:
            raise file_error(path, f"cannot be decoded ({width}x{height} pixels): out of memory", reason=SkipReason.TOO_LARGE,
                             fix=_IMAGE_SIZE_FIX, cause=err) from None
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, IndexError... on corrupt files
            raise file_error(path, "cannot be decoded as an image (corrupt or truncated)", cause=err, **undecodable) from None


_IMAGE_SIZE_FIX = f"downscale it (at most {checks.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels), or remove its row"


def _pixels(img: object, prep: Preprocessing, path: Path) -> np.ndarray:
    from PIL import Image

    assert isinstance(img, Image.Image)
    size = (prep.image_size, prep.image_size)
    img.load()
    if img.mode.startswith("I;16"):
        # 16-bit grayscale (common in medical imaging): scale by its own range, not 8-bit's.
        gray = Image.fromarray(np.asarray(img, dtype=np.float32) / 65535.0, mode="F").resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(gray, dtype=np.float32)[None]
        if prep.image_mode == "RGB":
            pixels = np.repeat(pixels, 3, axis=0)
    elif img.mode in ("I", "F"):
        raise file_error(
            path, f"is a {img.mode!r} (32-bit) image whose value range is unknown", reason=SkipReason.UNDECODABLE_IMAGE,
            fix="save it as 8-bit or 16-bit PNG/TIFF",
        )
    else:
        converted = img.convert(prep.image_mode).resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(converted, dtype=np.float32) / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.clip((pixels - 0.5) / 0.5, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- audio
def load_audio(path: Path, prep: Preprocessing) -> np.ndarray:
    """Decode one clip: float32 ``[clip_samples]`` at ``audio-rate``, mono, padded or trimmed."""
    import soundfile as sf

    if not _is_file(path):
        raise file_error(path, "audio file not found", reason=SkipReason.MISSING_FILE, fix=_MISSING_FIX)
    undecodable = dict(reason=SkipReason.UNDECODABLE_AUDIO, fix="replace the corrupt file, or remove its row")
    try:
        info = sf.info(str(path))  # the header only
    except Exception as err:  # libsndfile's failures on a hostile file are a bad row, named
        raise file_error(path, "cannot be decoded as audio (WAV, FLAC, OGG)", cause=err, **undecodable) from None
    rate, channels, frames = int(info.samplerate), int(info.channels), int(info.frames)
    _check_audio_header(path, prep, rate, channels, frames)
    truncated = wav_truncation(path)  # libsndfile clamps a truncated WAV's length: read the header ourselves
    if truncated is not None:
        raise _truncated(path, rate, *truncated)
    resampling = rate != prep.audio_rate
    # only what the clip needs (plus 0.1 s for the resampling filter at the cut)
    needed = int(math.ceil(prep.audio_seconds * rate)) + (rate // 10 if resampling else 0)
    try:
        samples, _ = sf.read(path, frames=min(needed, frames), dtype="float64", always_2d=True)  # float64: a 64-bit file as written
    except MemoryError as err:
        raise file_error(path, "cannot be decoded: out of memory", reason=SkipReason.TOO_LARGE, fix="shorten the recording, or remove its row", cause=err) from None
    except Exception as err:  # a decoder's failure on a hostile file: a bad row, named
        raise file_error(path, "cannot be decoded as audio (corrupt or truncated)", cause=err, **undecodable) from None
    if samples.shape[0] == 0:
        raise file_error(path, "holds no samples", reason=SkipReason.EMPTY_AUDIO, fix="replace the empty recording, or remove its row")
    if samples.shape[0] < min(needed, frames):  # FLAC/OGG: fewer frames than the header promised
        raise _truncated(path, rate, frames, samples.shape[0])
    if not np.isfinite(samples).all():
        raise file_error(path, f"holds {int((~np.isfinite(samples)).sum())} NaN or infinite samples", reason=SkipReason.NON_FINITE, fix="re-export the recording, or remove its row")
    check_range(samples, path, "samples", fix="re-export the recording (samples in [-1, 1]), or remove its row")
    mono = samples.mean(axis=1).astype(np.float32)
    if resampling:
        import librosa

        try:
            mono = librosa.resample(mono, orig_sr=rate, target_sr=prep.audio_rate)
        except MemoryError as err:
            raise file_error(path, f"cannot be resampled from {rate} Hz: out of memory", reason=SkipReason.TOO_LARGE,
                             fix=f"resample the file to {prep.audio_rate} Hz before loading", cause=err) from None
    clip = np.zeros(prep.clip_samples, dtype=np.float32)
    n = min(prep.clip_samples, mono.shape[0])
    clip[:n] = mono[:n]
    return clip


def _truncated(path: Path, rate: int, declared: int, held: int) -> SampleError:
    return file_error(
        path, f"is truncated: its header says {declared} frames ({declared / rate:.3f} s at {rate} Hz), the file holds {held} ({held / rate:.3f} s)",
        reason=SkipReason.UNDECODABLE_AUDIO, fix="copy or export the recording again (an interrupted copy?), or remove its row",
    )


def _check_audio_header(path: Path, prep: Preprocessing, rate: int, channels: int, frames: int) -> None:
    """Refuse, from the header alone, what would be nonsense or too costly to decode."""
    if channels > checks.MAX_AUDIO_CHANNELS:
        raise file_error(
            path, f"has {channels} channels, more than the {checks.MAX_AUDIO_CHANNELS} that are mixed down to mono", reason=SkipReason.WRONG_SHAPE,
            fix="mix the recording down to mono or stereo, or remove its row",
        )
    if rate != prep.audio_rate:
        if not prep.audio_resample:
            raise file_error(
                path, f"sample rate is {rate} Hz, expected {prep.audio_rate} Hz", reason=SkipReason.SAMPLE_RATE,
                fix=f"resample the file, set audio-rate={rate} if all files use it, or set audio-resample=true to resample on load",
            )
        ratio = max(rate / prep.audio_rate, prep.audio_rate / max(rate, 1))
        if rate > checks.MAX_AUDIO_RATE or ratio > checks.MAX_RESAMPLE_RATIO:
            raise file_error(
                path, f"sample rate is {rate} Hz, {ratio:.0f} times {'above' if rate > prep.audio_rate else 'below'} audio-rate={prep.audio_rate} Hz "
                f"(resampling is limited to {checks.MAX_RESAMPLE_RATIO}x, rates to {checks.MAX_AUDIO_RATE} Hz)",
                reason=SkipReason.SAMPLE_RATE, fix=f"resample the file to {prep.audio_rate} Hz yourself, or remove its row",
            )
    if frames == 0:
        raise file_error(path, "holds no samples", reason=SkipReason.EMPTY_AUDIO, fix="replace the empty recording, or remove its row")
    if frames < checks.MIN_AUDIO_SECONDS * rate:
        raise file_error(
            path, f"lasts {1000 * frames / rate:.1f} ms ({frames} samples), shorter than the {1000 * checks.MIN_AUDIO_SECONDS:.0f} ms minimum",
            reason=SkipReason.SHORT_AUDIO, fix="replace the recording, or leave the cell empty to mark the audio missing",
        )


# ---------------------------------------------------------------- sensors
def load_sensor(path: Path, prep: Preprocessing, *, channels: int | None, set_by: str = "the other rows") -> np.ndarray:
    """Load one ``.npy`` series ``[channels, time]`` (or ``[time]``), padded or trimmed to ``sensor-length``.

    The header is checked against the file's size before any data is read, and only the
    first ``sensor-length`` steps are read (memory-mapped), so NaNs beyond them do not matter.
    """
    if not _is_file(path):
        raise file_error(path, "sensor file not found", reason=SkipReason.MISSING_FILE, fix=_MISSING_FIX)
    shape, dtype = npy_header(path)
    if len(shape) not in (1, 2):
        raise file_error(path, f"holds an array of shape {shape}, expected [channels, time] or [time]", reason=SkipReason.WRONG_SHAPE, fix="save a 1-D or 2-D numeric array")
    if 0 in shape:
        raise file_error(path, f"is empty (shape {shape})", reason=SkipReason.WRONG_SHAPE, fix="save the series, or leave the cell empty to mark it missing")
    n_channels = shape[0] if len(shape) == 2 else 1
    if n_channels > checks.MAX_SENSOR_CHANNELS:
        raise file_error(
            path, f"has {n_channels} channels, beyond the limit of {checks.MAX_SENSOR_CHANNELS}", reason=SkipReason.TOO_LARGE,
            fix="save the series as [channels, time] (transpose it?), or remove its row",
        )
    if channels is not None and n_channels != channels:
        raise file_error(path, f"has {n_channels} channels, {set_by} {channels}", reason=SkipReason.WRONG_SHAPE, fix="save every series of this column with the same channels, [channels, time]")
    length = prep.sensor_length or min(shape[-1], checks.MAX_SENSOR_LENGTH)  # None (auto): the file's own length
    n = min(length, shape[-1])
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        part = np.array(mapped[:, :n] if mapped.ndim == 2 else mapped[None, :n])  # a copy: the file is closed after
        del mapped
    except MemoryError as err:
        raise file_error(path, "cannot be read: out of memory", reason=SkipReason.TOO_LARGE, fix="remove its row", cause=err) from None
    except Exception as err:  # a decoder's failure on a hostile file: a bad row, named
        raise file_error(path, "cannot be read as a .npy array", reason=SkipReason.BAD_SENSOR, fix="save it with numpy.save", cause=err) from None
    if not np.isfinite(part).all():
        bad = int((~np.isfinite(part)).sum())
        raise file_error(path, f"holds {bad} NaN or infinite values", reason=SkipReason.NON_FINITE, fix="impute or drop them before saving, or remove the row")
    if not np.issubdtype(dtype, np.integer):
        check_range(part, path, "values", fix="rescale the series before saving, or remove the row")
    out = np.zeros((n_channels, length), dtype=np.float32)
    out[:, :n] = part
    return out


_KINDS = {"b": "boolean", "c": "complex", "U": "text", "S": "bytes", "V": "raw", "M": "datetime", "m": "timedelta"}


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:  # type: ignore[type-arg]
    """The shape and dtype a ``.npy`` header declares, checked against the file's size (nothing else is read)."""
    fix = "save one numeric array with numpy.save"
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            if handle.read(4) == b"PK\x03\x04":
                raise file_error(path, "is an .npz archive, not one array", reason=SkipReason.BAD_SENSOR, fix=fix)
            handle.seek(0)
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f".npy format version {version}")
            offset = handle.tell()
    except SampleError:
        raise
    except Exception as err:  # the header's text may be anything: only in the detail
        raise file_error(path, "is not a .npy array (its header cannot be read)", reason=SkipReason.BAD_SENSOR, fix=fix, cause=err) from None
    if dtype.hasobject:
        raise file_error(path, "holds Python objects (pickled), which fedmm never loads", reason=SkipReason.BAD_SENSOR, fix=fix)
    if dtype.fields is not None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        kind = "structured" if dtype.fields is not None else _KINDS.get(dtype.kind, "non-numeric")
        raise file_error(path, f"holds {kind} values, expected integers or floats", reason=SkipReason.WRONG_SHAPE, fix=fix)
    promised = math.prod(shape) * dtype.itemsize
    if promised > size - offset:
        raise file_error(
            path, f"has a header that promises {promised} bytes of data (shape {shape}), but the file holds {size - offset}",
            reason=SkipReason.BAD_SENSOR, fix="the file is truncated or forged: save the series again with numpy.save",
        )
    return tuple(int(d) for d in shape), dtype
