"""Loaders against the raw files: shapes, labels, the speaker split, pairing, bad files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedmm.data.audio import N_MELS, read_clip
from fedmm.data.avmnist import SPEAKERS, TEST_INDICES, builtin_root, list_recordings, load_site, load_test, resolve_root
from fedmm.data.idx import read_idx
from fedmm.errors import ConfigError, DataError


def test_idx_reader_reads_the_original_mnist_files(shared_data: Path) -> None:
    images = read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")

    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # MNIST t10k


def test_full_data_speaker_split(shared_data: Path) -> None:
    sites = {s: load_site(shared_data, s) for s in SPEAKERS}
    test = load_test(shared_data)

    for speaker, arrays in sites.items():
        assert len(arrays) == 450  # 10 digits x recordings 5..49
        assert arrays.features["image"].shape == (450, 1, 28, 28)
        assert arrays.features["audio"].shape[:3] == (450, 1, N_MELS)
        assert np.bincount(arrays.label).tolist() == [45] * 10
        assert all(name.split("_")[1] == speaker for name in arrays.ids)
    assert len(test) == 300
    assert all(int(name.split("_")[2]) in TEST_INDICES for name in test.ids)


def test_no_image_is_shared_by_two_sites_or_with_the_test_set(shared_data: Path) -> None:
    ids = [load_site(shared_data, s).groups["image_id"] for s in SPEAKERS] + [load_test(shared_data).groups["image_id"]]
    flat = np.concatenate(ids)

    assert len(np.unique(flat)) == len(flat)


def test_each_image_shows_the_spoken_digit(shared_data: Path) -> None:
    labels = read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    arrays = load_site(shared_data, "theo")

    assert np.array_equal(labels[arrays.groups["image_id"]], arrays.label)
    assert [int(name[0]) for name in arrays.ids] == arrays.label.tolist()


def test_builtin_subset_is_bit_identical_to_the_raw_files(shared_data: Path) -> None:
    builtin = builtin_root()
    for rec in list_recordings(builtin, "yweweler")[::25]:
        flac, rate = sf.read(rec.path, dtype="int16")
        wav, wav_rate = sf.read(shared_data / "fsdd" / "recordings" / f"{rec.path.stem}.wav", dtype="int16")
        assert rate == wav_rate == 8000
        assert np.array_equal(flac, wav)
    small, full = load_site(builtin, "yweweler"), load_site(shared_data, "yweweler")
    shared = np.isin(full.ids, small.ids)
    assert shared.sum() == len(small) == 250
    assert np.allclose(full.features["audio"][shared], small.features["audio"])
    assert np.array_equal(full.features["image"][shared], small.features["image"])


def test_builtin_subset_works_without_shared_data() -> None:
    root = resolve_root("avmnist")
    site, test = load_site(root, "george"), load_test(root)

    assert len(site) == 250 and len(test) == 300
    assert np.isfinite(site.features["audio"]).all() and np.isfinite(site.features["image"]).all()
    assert not set(site.ids) & set(test.ids)


# ------------------------------------------------------------------ bad input
@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    """A writable copy of part of the built-in root, to break on purpose."""
    src = builtin_root()
    (tmp_path / "fsdd" / "recordings").mkdir(parents=True)
    for rec in list_recordings(src, "george")[:12]:
        shutil.copy(rec.path, tmp_path / "fsdd" / "recordings" / rec.path.name)
    shutil.copytree(src / "mnist", tmp_path / "mnist")
    return tmp_path


def test_missing_mnist_file_names_the_file(small_root: Path) -> None:
    (small_root / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: file not found"):
        load_site(small_root, "george")


def test_truncated_idx_file_is_reported(small_root: Path) -> None:
    path = small_root / "mnist" / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))

    with pytest.raises(DataError, match="truncated or corrupt") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_corrupt_gzip_is_reported(small_root: Path) -> None:
    path = small_root / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])

    with pytest.raises(DataError, match="cannot decompress"):
        read_idx(path)


def test_undecodable_audio_names_the_file(small_root: Path) -> None:
    victim = small_root / "fsdd" / "recordings" / "0_george_7.flac"  # a training recording
    victim.write_bytes(b"RIFF not really a wave file")

    with pytest.raises(DataError, match="cannot decode audio") as err:
        load_site(small_root, "george")
    assert victim.name in str(err.value)


def test_wrong_sample_rate_is_reported_with_a_fix(tmp_path: Path) -> None:
    clip, _ = sf.read(list_recordings(builtin_root(), "george")[0].path, dtype="int16")
    path = tmp_path / "0_george_7.wav"
    sf.write(path, clip, 16_000)

    with pytest.raises(DataError, match="16000 Hz, expected 8000 Hz") as err:
        read_clip(path)
    assert "resample" in str(err.value)


def test_badly_named_recording_is_reported(small_root: Path) -> None:
    (small_root / "fsdd" / "recordings" / "x_george_1.wav").write_bytes(b"")

    with pytest.raises(DataError, match="does not follow FSDD"):
        list_recordings(small_root, "george")


def test_unknown_data_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'data'"):
        resolve_root("imagenet")
    with pytest.raises(ConfigError, match="not a folder"):
        resolve_root("avmnist:/nonexistent/folder")
