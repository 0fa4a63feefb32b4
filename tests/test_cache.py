"""The built-in dataset's feature cache: same features as without it, never stale, never fatal."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from fedmm.data import avmnist
from fedmm.data.audio import log_mel
from fedmm.data.cache import CACHE_ENV, cache_dir, cached_features


def _counting(calls: list[int]):  # type: ignore[no-untyped-def]
    def compute(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x[:, ::2] * 2.0

    return compute


def test_a_second_load_reads_the_cache_and_gives_the_same_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    avmnist._load.cache_clear()
    first = avmnist.load_site(avmnist.builtin_root(), "theo").features["audio"]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1

    avmnist._load.cache_clear()
    monkeypatch.setattr(avmnist, "log_mel", lambda _clips: pytest.fail("log-mel recomputed despite the cache"))
    second = avmnist.load_site(avmnist.builtin_root(), "theo").features["audio"]
    avmnist._load.cache_clear()

    assert np.array_equal(first, second) and second.dtype == np.float32
    clips = np.stack([avmnist.read_clip(r.path) for r in avmnist.list_recordings(avmnist.builtin_root(), "theo") if r.index not in avmnist.TEST_INDICES])
    assert np.array_equal(second, log_mel(clips))  # the cached maps are what librosa computes


def test_any_change_to_the_input_or_the_settings_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls: list[int] = []
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = cached_features("k", x, {"n": 1}, _counting(calls))
    assert np.array_equal(cached_features("k", x.copy(), {"n": 1}, _counting(calls)), a) and calls == [3]
    changed = x.copy()
    changed[2, 3] += 1e-3  # one sample of one clip
    cached_features("k", changed, {"n": 1}, _counting(calls))
    cached_features("k", x, {"n": 2}, _counting(calls))
    cached_features("other", x, {"n": 1}, _counting(calls))
    assert calls == [3, 3, 3, 3]


def test_a_corrupt_entry_is_reported_and_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls: list[int] = []
    x = np.ones((2, 4), np.float32)
    expected = cached_features("k", x, {}, _counting(calls))
    (entry,) = (tmp_path / "k").glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:40])  # cut short, as by a full disk

    with caplog.at_level(logging.WARNING, logger="fedmm.data.cache"):
        again = cached_features("k", x, {}, _counting(calls))

    assert np.array_equal(again, expected) and calls == [2, 2]
    assert str(entry) in caplog.text and "recomputing" in caplog.text
    assert np.array_equal(np.load(entry), expected)  # and the entry is whole again


def test_an_unwritable_cache_is_reported_once_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv(CACHE_ENV, str(blocked))
    calls: list[int] = []
    with caplog.at_level(logging.WARNING, logger="fedmm.data.cache"):
        for _ in range(2):
            out = cached_features("k", np.ones((2, 2), np.float32), {}, _counting(calls))
    assert out.shape == (2, 1) and calls == [2, 2]
    assert caplog.text.count("cannot write the feature cache") == 1 and CACHE_ENV in caplog.text


@pytest.mark.parametrize("value", ["off", "0", ""])
def test_the_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(CACHE_ENV, value)
    monkeypatch.chdir(tmp_path)
    assert cache_dir() is None
    calls: list[int] = []
    cached_features("k", np.ones((2, 2), np.float32), {}, _counting(calls))
    cached_features("k", np.ones((2, 2), np.float32), {}, _counting(calls))
    assert calls == [2, 2] and not os.listdir(tmp_path)


def test_the_default_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "fedmm"
