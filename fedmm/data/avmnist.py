"""AV-MNIST: an MNIST image paired with a spoken recording of the same digit (FSDD).

The six FSDD speakers are six data sites, a natural non-IID split: each site
holds its own voice. FSDD's official test split (recordings 0-4 of every
speaker and digit) is held out for central evaluation; no site trains on it.

Pairing is deterministic and needs no global view: the recording
``{digit}_{speaker}_{index}`` gets the ``k``-th MNIST test-set image of that
digit (in file order) with ``k = 50 * rank(speaker) + index``. Distinct
recordings therefore get distinct images, so no image is shared by two sites
or by a site and the test set.

A data root is laid out like ``shared/data``::

    ROOT/fsdd/recordings/{digit}_{speaker}_{index}.wav   (8 kHz mono; .flac also read)
    ROOT/mnist/t10k-images-idx3-ubyte.gz
    ROOT/mnist/t10k-labels-idx1-ubyte.gz

The package ships such a root (a real subset, see ``fedmm/data/builtin/avmnist/SOURCE.md``),
used when the run config says ``data = "avmnist"``; ``data = "avmnist:PATH"``
reads another root.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from fedmm.data.audio import CLIP_SAMPLES, HOP_LENGTH, LOG_MEL_PARAMS, N_MELS, log_mel, read_clip
from fedmm.data.cache import cached_features
from fedmm.data.idx import read_idx
from fedmm.data.schema import Modality, ModalityKind, MultimodalDataset, Schema
from fedmm.errors import ConfigError, DataError

__all__ = [
    "SPEAKERS",
    "RECORDINGS_PER_DIGIT",
    "TEST_INDICES",
    "SCHEMA",
    "load_pool",
    "Recording",
    "builtin_root",
    "resolve_root",
    "list_recordings",
    "unused_recordings",
    "load_site",
    "load_test",
]

SPEAKERS: tuple[str, ...] = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
RECORDINGS_PER_DIGIT = 50  # FSDD: indices 0..49 for each speaker and digit
TEST_INDICES = range(0, 5)  # FSDD's official test split
IMAGE_MEAN, IMAGE_STD = 0.1307, 0.3081  # MNIST training-set statistics (public constants)
SCHEMA = Schema(
    (
        Modality("image", ModalityKind.IMAGE, (1, 28, 28), "pixels"),
        Modality("audio", ModalityKind.AUDIO, (1, N_MELS, 1 + CLIP_SAMPLES // HOP_LENGTH), "log-mel"),
    ),
    tuple(str(d) for d in range(10)),
)
log = logging.getLogger(__name__)
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)$")
_AUDIO_SUFFIXES = (".wav", ".flac")


@dataclass(frozen=True)
class Recording:
    """One FSDD recording, identified by its file name."""

    digit: int
    speaker: str
    index: int
    path: Path

    @property
    def image_rank(self) -> int:
        """Rank of the paired image among the MNIST images of the same digit."""
        return RECORDINGS_PER_DIGIT * SPEAKERS.index(self.speaker) + self.index


def builtin_root() -> Path:
    """Return the folder of the AV-MNIST subset that ships inside the package."""
    return Path(str(resources.files("fedmm.data").joinpath("builtin", "avmnist")))


def resolve_root(spec: str) -> Path:
    """Turn the run config's ``data`` value into a data root.

    >>> resolve_root("avmnist") == builtin_root()
    True
    """
    name, _, location = spec.partition(":")
    if name != "avmnist":
        raise ConfigError("data", "unknown data source", value=spec, fix="use 'avmnist' or 'avmnist:/path/to/root'")
    root = Path(location).expanduser().resolve() if location else builtin_root()
    if not root.is_dir():
        raise ConfigError("data", f"data root {root} is not a folder", value=spec, fix="point it at the folder that holds fsdd/recordings/ and mnist/ (as shared/data does)")
    missing = [sub for sub in ("fsdd/recordings", "mnist") if not (root / sub).is_dir()]
    if missing:
        # a subfolder of the root (fsdd, fsdd/recordings or mnist) passed instead of the root itself?
        parent = next((p for p in (root.parent, root.parent.parent) if (p / "fsdd" / "recordings").is_dir() and (p / "mnist").is_dir()), None)
        raise ConfigError(
            "data", f"data root {root} has no {' and no '.join(repr(m + '/') for m in missing)} subfolder"
            + (f": it is a subfolder of the data root {parent}" if parent else ""), value=spec,
            fix=(f"pass the data root itself, data='avmnist:{parent}'" if parent else "pass the folder that holds fsdd/recordings/ and mnist/")
            + " (ROOT must hold fsdd/recordings/*.wav and mnist/t10k-*-ubyte.gz, as shared/data does)",
        )
    return root


def list_recordings(root: Path, speaker: str) -> list[Recording]:
    """List one speaker's recordings under ``root``, sorted by digit then index.

    Raises
    ------
    DataError
        If the folder is missing, a file name does not follow FSDD's pattern, or the
        speaker has no recording.
    """
    if speaker not in SPEAKERS:
        raise DataError(root, f"unknown FSDD speaker {speaker!r}", fix=f"use one of {', '.join(SPEAKERS)}")
    folder = root / "fsdd" / "recordings"
    if not folder.is_dir():
        raise DataError(folder, "recordings folder not found", fix="lay the data root out like shared/data (fsdd/recordings/*.wav)")
    found = []
    for path in folder.glob(f"*_{speaker}_*"):
        if path.suffix not in _AUDIO_SUFFIXES:
            continue
        match = _NAME.match(path.stem)
        if match is None or not 0 <= int(match.group(3)) < RECORDINGS_PER_DIGIT:
            raise DataError(path, "file name does not follow FSDD's {digit}_{speaker}_{index} with index 0-49", fix="rename or remove the file")
        found.append(Recording(int(match.group(1)), match.group(2), int(match.group(3)), path))
    if not found:
        raise DataError(
            folder, f"no recording of speaker {speaker!r}: AV-MNIST's sites are the six FSDD speakers ({', '.join(SPEAKERS)}), "
            "and every one needs its recordings",
            fix=f"add {speaker}'s recordings ({{digit}}_{speaker}_{{index}}.wav) to this folder, or use the built-in subset (data='avmnist'); "
            "for other speakers, describe the recordings in a manifest (data='manifest:PATH', see docs/data.md)",
        )
    return sorted(found, key=lambda r: (r.digit, r.index))


@functools.lru_cache(maxsize=8)
def unused_recordings(root: Path) -> tuple[str, ...]:
    """Audio files of ``ROOT/fsdd/recordings`` that belong to no known speaker (so no site reads them); warned once a root."""
    folder = root / "fsdd" / "recordings"
    if not folder.is_dir():
        return ()
    unused = []
    for path in folder.iterdir():
        if path.suffix in _AUDIO_SUFFIXES:
            match = _NAME.match(path.stem)
            if (match is None and not any(f"_{s}_" in path.name for s in SPEAKERS)) or (match and match.group(2) not in SPEAKERS):
                unused.append(path.name)  # (a misnamed file of a known speaker is refused by list_recordings)
    unused.sort()
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        log.warning(
            "%s: %d recording(s) are of no FSDD speaker (%s) and are not used: %s. AV-MNIST's sites are those six speakers; "
            "to train on other recordings, describe them in a manifest (data='manifest:PATH', see docs/data.md), or remove them",
            folder, len(unused), ", ".join(SPEAKERS), shown,
        )
    return tuple(unused)


@functools.lru_cache(maxsize=4)
def _mnist(root: Path) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Load MNIST images and, per digit, their row numbers in file order."""
    images = read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels_path = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            labels_path.parent, f"images {images.shape} and labels {labels.shape} do not match MNIST's [N, 28, 28] and [N]",
            fix="use the original t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz",
        )
    by_digit = {d: np.flatnonzero(labels == d) for d in range(10)}
    return images, by_digit


@functools.lru_cache(maxsize=16)
def _load(root: Path, speakers: tuple[str, ...], test: bool) -> MultimodalDataset:
    unused_recordings(root)
    images, by_digit = _mnist(root)
    recordings = [
        r for s in speakers for r in list_recordings(root, s) if (r.index in TEST_INDICES) == test
    ]
    if not recordings:
        raise DataError(root, f"no {'test' if test else 'training'} recordings for {', '.join(speakers)}", fix="check the data root")
    image_id = np.empty(len(recordings), dtype=np.int64)
    for i, rec in enumerate(recordings):
        rows = by_digit[rec.digit]
        if rec.image_rank >= len(rows):
            raise DataError(
                root / "mnist", f"only {len(rows)} images of digit {rec.digit}; recording {rec.path.name} needs image #{rec.image_rank}",
                fix="use the full MNIST test split",
            )
        image_id[i] = rows[rec.image_rank]
    clips = np.stack([read_clip(r.path) for r in recordings])
    pixels = images[image_id].astype(np.float32)[:, None] / 255.0
    arrays = MultimodalDataset(
        SCHEMA,
        {"image": (pixels - IMAGE_MEAN) / IMAGE_STD, "audio": cached_features("avmnist-log-mel", clips, LOG_MEL_PARAMS, log_mel)},
        np.ones((len(recordings), 2), dtype=bool),
        np.array([r.digit for r in recordings], dtype=np.int64),
        {"speaker": np.array([r.speaker for r in recordings]), "image_id": image_id},
        tuple(r.path.stem for r in recordings),
    )
    for array in (*arrays.features.values(), arrays.label, arrays.present, *arrays.groups.values()):
        array.flags.writeable = False
    return arrays


def load_pool(root: Path, speakers: tuple[str, ...] = SPEAKERS) -> MultimodalDataset:
    """Load every site's training data as one pool, grouped by ``speaker`` (for partitioners)."""
    return _load(Path(root), tuple(speakers), False)


def load_site(root: Path, speaker: str) -> MultimodalDataset:
    """Load one site's training data: the speaker's recordings 5-49 and their images."""
    return _load(Path(root), (speaker,), False)


def load_test(root: Path, speakers: tuple[str, ...] = SPEAKERS) -> MultimodalDataset:
    """Load the held-out test set: recordings 0-4 of each speaker and their images."""
    return _load(Path(root), tuple(speakers), True)
