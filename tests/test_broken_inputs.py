"""Data loaders against a dishonest site or attacker (issue 17): every broken file is a named row-level error.

Each broken file is generated here, in ``tmp_path`` (no committed binaries): paths that
leave the manifest's folder, files whose headers claim absurd sizes, decoder errors, and a
non-manifest file whose contents must never reach an error message. ``fedmm data check``
must answer each with exit 1 (or 2), the row, the file and a fix, and no traceback.
"""

from __future__ import annotations

import csv
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from fedmm.cli import app
from fedmm.data.manifest import load_manifest, write_manifest
from fedmm.errors import ConfigError, DataError

def _prep(**changes: object):  # type: ignore[no-untyped-def]
    from fedmm.data.preprocess import Preprocessing

    return Preprocessing(**changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------ broken files, made here
def _png_of_size(path: Path, width: int, height: int) -> Path:
    """A valid, all-black grayscale PNG of any size, streamed (never held in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte 0, then black pixels
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return path


def _npy_claiming(path: Path, shape: tuple[int, ...], *, size: int = 192, descr: str = "<f8") -> Path:
    """A small .npy whose header claims ``shape``: the data it promises is not there."""
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    raw = header.getvalue()
    path.write_bytes(raw + bytes(max(0, size - len(raw))))
    return path


def _wav(path: Path, frames: int, channels: int, rate: int) -> Path:
    sf.write(path, np.zeros((frames, channels), np.int16), rate, subtype="PCM_16")
    return path


def _good_png(path: Path) -> Path:
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(path)
    return path


def _manifest(folder: Path, column: str, cell: str, *, name: str = "manifest.csv") -> Path:
    """Row 2 is good (a tabular value only); row 3 holds ``cell`` in ``column``."""
    rows = [
        {column: "", "tabular:x": "1", "label": "a"},
        {column: cell, "tabular:x": "", "label": "a"},
    ]
    return write_manifest(folder / name, rows)


def _corpus(folder: Path) -> dict[str, tuple[str, str, str, list[str]]]:
    """name -> (column, cell, file name the output must show, --set overrides)."""
    (folder / "f").mkdir(exist_ok=True)
    outside = folder.parent / f"{folder.name}-outside.png"
    _good_png(outside)
    f = folder / "f"
    (f / "link.png").symlink_to(outside)
    _npy_claiming(f / "huge_header.npy", (1_000_000, 10_000_000))
    _npy_claiming(f / "truncated.npy", (3, 100), size=200)
    np.save(f / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (f / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"\xff" * 50)
    (f / "zero.npy").write_bytes(b"")
    np.save(f / "scalar.npy", np.float32(3.0))
    np.save(f / "many_channels.npy", np.zeros((5000, 4), np.float32))
    _wav(f / "one_hz.wav", 1_000_000, 1, 1)
    _wav(f / "1024ch.wav", 3, 1024, 8000)
    _wav(f / "three_frames.wav", 3, 1, 8000)
    (f / "noise.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    (f / "empty.wav").write_bytes(b"")
    _png_of_size(f / "giant.png", 13_300, 13_300)
    (f / "text.png").write_text("this is not an image")
    good = _good_png(f / "ok.png").read_bytes()
    (f / "truncated.png").write_bytes(good[: len(good) // 2])
    (f / "empty.png").write_bytes(b"")
    (f / "folder.png").mkdir()
    (f / "loop1.png").symlink_to(f / "loop2.png")
    (f / "loop2.png").symlink_to(f / "loop1.png")
    os.mkfifo(f / "fifo.png")  # opening it would wait forever for a writer
    return {
        "parent path": ("image", f"../{outside.name}", outside.name, []),
        "absolute path": ("image", str(outside), outside.name, []),
        "symlink outside": ("image", "f/link.png", "link.png", []),
        "npy huge header": ("sensor", "f/huge_header.npy", "huge_header.npy", []),
        "npy truncated": ("sensor", "f/truncated.npy", "truncated.npy", []),
        "npy objects": ("sensor", "f/objects.npy", "objects.npy", []),
        "npy garbage": ("sensor", "f/garbage.npy", "garbage.npy", []),
        "npy zero bytes": ("sensor", "f/zero.npy", "zero.npy", []),
        "npy scalar": ("sensor", "f/scalar.npy", "scalar.npy", []),
        "npy channels": ("sensor", "f/many_channels.npy", "many_channels.npy", []),
        "wav 1 Hz resampled": ("audio", "f/one_hz.wav", "one_hz.wav", ["audio-resample=true"]),
        "wav 1024 channels": ("audio", "f/1024ch.wav", "1024ch.wav", []),
        "wav 3 frames": ("audio", "f/three_frames.wav", "three_frames.wav", []),
        "flac noise": ("audio", "f/noise.flac", "noise.flac", []),
        "wav zero bytes": ("audio", "f/empty.wav", "empty.wav", []),
        "png 13300x13300": ("image", "f/giant.png", "giant.png", []),
        "png text": ("image", "f/text.png", "text.png", []),
        "png truncated": ("image", "f/truncated.png", "truncated.png", []),
        "png zero bytes": ("image", "f/empty.png", "empty.png", []),
        "png folder": ("image", "f/folder.png", "folder.png", []),
        "rich markup name": ("image", "f/[bold]x[/bold].png", "[bold]x[/bold].png", []),
        "nul byte in path": ("image", "f/a\x00b.png", "x00b.png", []),
        "symlink loop": ("image", "f/loop1.png", "loop1.png", []),
        "fifo": ("image", "f/fifo.png", "fifo.png", []),
        "name too long": ("image", "f/" + "x" * 5000 + ".png", "xxxx.png", []),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, str, str, list[str]]]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, _corpus(folder)


CASES = [
    "parent path", "absolute path", "symlink outside", "npy huge header", "npy truncated", "npy objects", "npy garbage",
    "npy zero bytes", "npy scalar", "npy channels", "wav 1 Hz resampled", "wav 1024 channels", "wav 3 frames", "flac noise",
    "wav zero bytes", "png 13300x13300", "png text", "png truncated", "png zero bytes", "png folder", "rich markup name",
    "nul byte in path", "symlink loop", "fifo", "name too long",
]


def _check(args: list[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["data", "check", *args], env={"COLUMNS": "400"})


@pytest.mark.parametrize("case", CASES)
def test_each_broken_file_is_a_named_row_error_in_data_check(case: str, corpus: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    folder, cases = corpus
    column, cell, shown, overrides = cases[case]
    path = _manifest(folder, column, cell, name=f"{case.replace(' ', '_')}.csv")
    sets = [arg for o in overrides for arg in ("--set", o)]

    strict = _check([str(path), *sets])
    lenient = _check([str(path), "--lenient", *sets])

    for result in (strict, lenient):  # a crash would show here as an exception, not an exit code
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output
    assert strict.exit_code in (1, 2), strict.output
    assert "row 3" in strict.output and shown in strict.output and "Fix:" in strict.output, strict.output
    assert lenient.exit_code == 0, lenient.output
    assert "1 samples usable, 1 skipped" in lenient.output and "row 3" in lenient.output and shown in lenient.output


@pytest.mark.parametrize("case", CASES)
def test_the_message_a_site_may_send_holds_no_local_path(case: str, corpus: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    from fedmm.data.preprocess import Preprocessing

    folder, cases = corpus
    column, cell, shown, overrides = cases[case]
    path = _manifest(folder, column, cell, name=f"api-{case.replace(' ', '_')}.csv")
    prep = Preprocessing(audio_resample=bool(overrides))

    with pytest.raises(DataError) as caught:
        load_manifest(path, prep)
    err = caught.value
    assert str(folder) not in str(err) and shown not in str(err)  # the path, and the cell, only in the local detail
    assert "row 3" in str(err) and "Fix:" in str(err)
    assert shown in err.detail and str(folder) in err.detail  # type: ignore[attr-defined]
    assert len(load_manifest(path, prep, lenient=True)) == 1


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        (b"db_password=hunter2-SECRET,other\nx,y\n", "first line has 2 fields"),
        (b"label,api_key=hunter2-SECRET\n1,2\n", "column 2 of the header"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe hunter2-SECRET \x00\x01", "not UTF-8"),
        (b"", "is empty"),
        (b"label,tabular:x\n", "has no rows"),
        (b'label,tabular:x\n"hunter2-SECRET,1\n', "empty in every row"),  # an open quote: one cell to the end
    ],
)
def test_a_file_that_is_not_a_manifest_exits_1_without_quoting_it(tmp_path: Path, content: bytes, shown: str) -> None:
    path = tmp_path / "secret.csv"
    path.write_bytes(content)

    result = _check([str(path)])

    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert shown in result.output and "Fix:" in result.output and "hunter2" not in result.output


# ------------------------------------------------------------------ 1. paths stay in the manifest's folder
def test_paths_outside_the_manifest_folder_are_refused_unless_a_root_allows_them(tmp_path: Path) -> None:
    from fedmm.data.preprocess import SkipReason

    site = tmp_path / "site"
    shared = tmp_path / "shared"
    site.mkdir()
    shared.mkdir()
    _good_png(shared / "x.png")
    _good_png(site / "inside.png")
    (site / "alias.png").symlink_to(site / "inside.png")  # a link that stays inside is fine
    rows = [
        {"image": "inside.png", "label": "a"}, {"image": "alias.png", "label": "a"},
        {"image": "../shared/x.png", "label": "b"}, {"image": str(shared / "x.png"), "label": "b"},
    ]
    path = write_manifest(site / "m.csv", rows)
    prep = _prep()

    with pytest.raises(DataError, match=r"row 4, column 'image'.*outside"):
        load_manifest(path, prep)
    ds = load_manifest(path, prep, lenient=True)
    assert len(ds) == 2 and ds.skipped == {SkipReason.OUTSIDE_FOLDER: 2}
    allowed = load_manifest(path, prep, roots=(site, shared))  # the site's config names another root
    assert len(allowed) == 4


# ------------------------------------------------------------------ 2. no file contents, no local path, in what may be sent
def test_a_file_that_is_not_a_manifest_is_never_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("db_password=hunter2-SECRET,other\nx,y\n")
    with pytest.raises(DataError) as caught:
        load_manifest(secret, _prep())
    err = caught.value
    texts = (str(err), getattr(err, "detail", ""), getattr(err, "local_message", ""))
    assert not any("hunter2" in t or "db_password" in t for t in texts)
    assert "first line has 2 fields" in str(err) and str(tmp_path) not in str(err)
    assert str(secret) in err.detail  # type: ignore[attr-defined]

    labelled = tmp_path / "labelled.csv"  # a 'label' column, and a secret as another column's name
    labelled.write_text("label,api_key=sk-LIVE-123\n1,2\n")
    with pytest.raises(DataError) as caught:
        load_manifest(labelled, _prep())
    assert "sk-LIVE" not in str(caught.value) and "column 2" in str(caught.value)


def test_row_values_stay_in_the_local_detail(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", [{"tabular:age": "31", "label": "flu"}, {"tabular:age": "patient-4711", "label": "flu"}])
    with pytest.raises(DataError) as caught:
        load_manifest(path, _prep())
    err = caught.value
    assert "patient-4711" not in str(err) and "row 3, column 'tabular:age'" in str(err) and "is not a number" in str(err)
    assert "patient-4711" in err.local_message and str(path) in err.local_message  # type: ignore[attr-defined]


def test_data_error_keeps_its_old_form_without_a_detail() -> None:
    err = DataError("/x/y.csv", "is broken", fix="replace it")
    assert str(err) == "/x/y.csv: is broken. Fix: replace it" and err.detail == "" and err.local_message == str(err)  # type: ignore[attr-defined]
    split = DataError("manifest row 3", "is broken", fix="replace it", detail="file /x/a.png")  # type: ignore[call-arg]
    assert str(split) == "manifest row 3: is broken. Fix: replace it" and "/x/a.png" in split.local_message  # type: ignore[attr-defined]


# ------------------------------------------------------------------ 3. sizes checked before anything is allocated
def test_an_npy_header_claiming_a_huge_shape_is_refused_before_allocating(tmp_path: Path) -> None:
    from fedmm.data.decoders import load_sensor
    from fedmm.data.preprocess import SampleError

    path = _npy_claiming(tmp_path / "huge.npy", (1_000_000, 10_000_000))
    assert path.stat().st_size == 192
    with pytest.raises(SampleError, match="header"):
        load_sensor(path, _prep(), channels=None)


def test_a_long_sensor_file_is_read_only_as_far_as_needed(tmp_path: Path) -> None:
    from fedmm.data.decoders import load_sensor

    series = np.arange(2 * 1000, dtype=np.float64).reshape(2, 1000)
    series[:, 500:] = np.nan  # beyond sensor-length: never read, so no reason to refuse the row
    np.save(tmp_path / "long.npy", series)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(series[:, :200]))
    np.save(tmp_path / "flat.npy", np.arange(300, dtype=np.int16))

    out = load_sensor(tmp_path / "long.npy", _prep(sensor_length=100), channels=2)
    assert out.shape == (2, 100) and np.array_equal(out, series[:, :100])
    assert np.array_equal(load_sensor(tmp_path / "fortran.npy", _prep(sensor_length=100), channels=2), series[:, :100])
    assert np.array_equal(load_sensor(tmp_path / "flat.npy", _prep(sensor_length=100), channels=None)[0], np.arange(100))


def test_audio_limits_rate_ratio_channels_and_duration(tmp_path: Path) -> None:
    from fedmm.data.decoders import load_audio
    from fedmm.data.preprocess import SampleError, SkipReason

    resample = _prep(audio_resample=True)
    with pytest.raises(SampleError) as caught:
        load_audio(_wav(tmp_path / "1hz.wav", 1_000_000, 1, 1), resample)
    assert caught.value.reason == SkipReason.SAMPLE_RATE and "1 Hz" in str(caught.value)
    with pytest.raises(SampleError) as caught:
        load_audio(_wav(tmp_path / "wide.wav", 3, 1024, 8000), _prep())
    assert caught.value.reason == SkipReason.WRONG_SHAPE and "1024 channels" in str(caught.value)
    with pytest.raises(SampleError) as caught:
        load_audio(_wav(tmp_path / "short.wav", 3, 1, 8000), _prep())
    assert caught.value.reason == SkipReason.SHORT_AUDIO
    stereo = np.stack([np.linspace(-0.5, 0.5, 12_000)] * 2, axis=1)
    sf.write(tmp_path / "long.wav", stereo, 8000)  # 1.5 s: trimmed to 1 s, read only that far
    assert np.allclose(load_audio(tmp_path / "long.wav", _prep()), stereo[:8000, 0], atol=1e-4)
    sf.write(tmp_path / "48k.wav", np.zeros(48_000 * 3), 48_000)  # a common rate: resampled
    assert load_audio(tmp_path / "48k.wav", resample).shape == (8000,)


def test_images_beyond_the_pixel_limit_are_refused_from_the_header(tmp_path: Path) -> None:
    from fedmm.data import checks
    from fedmm.data.decoders import load_image
    from fedmm.data.preprocess import SampleError, SkipReason

    with pytest.raises(SampleError) as caught:
        load_image(_png_of_size(tmp_path / "giant.png", 13_300, 13_300), _prep())
    assert caught.value.reason == SkipReason.TOO_LARGE and "13300x13300" in str(caught.value)
    assert checks.MAX_IMAGE_PIXELS == 50_000_000
    assert load_image(_png_of_size(tmp_path / "wide.png", 4000, 3000), _prep()).shape == (1, 28, 28)  # 12 MP: a photo


def test_absurd_preprocessing_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="image-size"):
        _prep(image_size=200_000)
    with pytest.raises(ConfigError, match="sensor-length"):
        _prep(sensor_length=10**9)


def test_memory_and_unexpected_decoder_errors_become_row_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    from fedmm.data.preprocess import SkipReason

    _good_png(tmp_path / "a.png")
    path = write_manifest(tmp_path / "m.csv", [{"image": "a.png", "label": "x"}, {"image": "a.png", "label": "y"}])

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    with pytest.raises(DataError, match=r"row 2, column 'image'.*Fix:"):
        load_manifest(path, _prep())
    with pytest.raises(DataError, match="no usable row"):
        load_manifest(path, _prep(), lenient=True)

    def odd(*args: object, **kwargs: object) -> None:
        raise IndexError("tile out of range")  # a decoder's internal error on a hostile file

    monkeypatch.setattr(ImageFile.ImageFile, "load", odd)
    from fedmm.data.manifest import check_manifest

    report = check_manifest(path, _prep(image_size=29), lenient=True)
    assert report.dataset is None and [p.reason for p in report.problems] == [SkipReason.UNDECODABLE_IMAGE] * 2


# ------------------------------------------------------------------ 5. data check lists every bad row
def _many_bad(folder: Path, n: int) -> Path:
    _good_png(folder / "ok.png")
    rows = [{"image": "ok.png", "tabular:x": "1", "label": "a"}]
    rows += [{"image": f"missing-{i}.png", "tabular:x": "1", "label": "a"} for i in range(n - 1)]
    rows.append({"image": "ok.png", "tabular:x": "many", "label": "a"})
    rows.append({"image": "ok.png", "tabular:x": "2", "label": "a"})
    return write_manifest(folder / "m.csv", rows)


def test_strict_data_check_lists_every_bad_row(tmp_path: Path) -> None:
    path = _many_bad(tmp_path, 3)

    result = _check([str(path)])

    assert result.exit_code == 1, result.output
    assert "3 bad rows" in result.output
    for row, shown in ((3, "missing-0.png"), (4, "missing-1.png"), (5, "tabular:x")):
        assert f"row {row}" in result.output and shown in result.output
    assert result.output.count("Fix:") == 3


def test_strict_data_check_stops_listing_at_the_limit(tmp_path: Path) -> None:
    result = _check([str(_many_bad(tmp_path, 60)), "--skipped-csv", str(tmp_path / "bad.csv")])

    assert result.exit_code == 1 and "60 bad rows" in result.output and "and 10 more" in result.output
    assert result.output.count("Fix:") == 50
    with open(tmp_path / "bad.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 60


def test_lenient_data_check_lists_skipped_rows_and_writes_them_to_a_csv(tmp_path: Path) -> None:
    path = _many_bad(tmp_path, 3)
    out = tmp_path / "skipped.csv"

    result = _check([str(path), "--lenient", "--skipped-csv", str(out)])

    assert result.exit_code == 0, result.output
    assert "2 samples usable, 3 skipped" in result.output and "missing-1.png" in result.output and "row 5" in result.output
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["row"] for r in rows] == ["3", "4", "5"]
    assert rows[0]["column"] == "image" and rows[0]["file"] == "missing-0.png" and rows[0]["reason"] == "missing file"
    assert rows[2]["column"] == "tabular:x" and rows[2]["file"] == "" and rows[2]["fix"]
    assert set(rows[0]) >= {"row", "column", "file", "reason", "problem", "fix"}


def test_data_check_root_option_allows_a_shared_folder(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "shared").mkdir()
    _good_png(tmp_path / "shared" / "x.png")
    path = write_manifest(tmp_path / "site" / "m.csv", [{"image": "../shared/x.png", "label": "a"}])

    refused = _check([str(path)])
    allowed = _check([str(path), "--root", str(tmp_path / "shared")])

    assert refused.exit_code == 1 and "outside" in refused.output
    assert allowed.exit_code == 0, allowed.output
