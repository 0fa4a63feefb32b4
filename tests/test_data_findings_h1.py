"""Findings of a tester who followed only the README: each fixed, each checked on tiny files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedmm.data import avmnist
from fedmm.data.checks import SampleError, SkipReason
from fedmm.data.decoders import load_audio
from fedmm.data.manifest import check_manifest, load_manifest
from fedmm.data.preprocess import Preprocessing
from fedmm.errors import ConfigError, DataError

PREP = Preprocessing()


def _series(folder: Path, name: str, shape: tuple[int, ...], *, nan: bool = False, seed: int = 0) -> str:
    values = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    if nan:
        values.flat[0] = np.nan
    np.save(folder / name, values)
    return name


def _manifest(folder: Path, header: str, lines: list[str]) -> Path:
    path = folder / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(lines) + "\n")
    return path


# 1. the odd sensor shape is the row named, not the many rows that agree
def test_the_odd_transposed_series_is_named_not_the_rows_that_agree(tmp_path: Path) -> None:
    lines = [f"{_series(tmp_path, 'odd.npy', (20, 3))},a,train"]  # the first row is the odd one: [time, channels]
    lines += [f"{_series(tmp_path, f's{i}.npy', (3, 20), seed=i)},{'ab'[i % 2]},{'test' if i > 3 else 'train'}" for i in range(6)]
    path = _manifest(tmp_path, "sensor,label,split", lines)

    report = check_manifest(path, PREP)
    assert [(p.row, p.column, p.reason) for p in report.problems] == [(2, "sensor", SkipReason.WRONG_SHAPE)]
    assert "has 20 channels" in report.problems[0].problem and "6 of 7 series of this column have 3" in report.problems[0].problem
    assert "[time, channels]" in report.problems[0].problem and "array.T" in report.problems[0].fix

    ds = load_manifest(path, PREP, lenient=True)
    assert len(ds) == 6 and ds.skipped == {SkipReason.WRONG_SHAPE: 1} and ds.schema.modality("sensor").shape == (3, 20)


def test_when_lenient_loading_skips_every_test_row_the_error_says_so(tmp_path: Path) -> None:
    from fedmm.data.sources import load_source

    lines = [f"{_series(tmp_path, f't{i}.npy', (3, 20), seed=i)},a,train" for i in range(5)]
    lines += [f"{_series(tmp_path, f'x{i}.npy', (3, 20), nan=True)},a,test" for i in range(2)]
    path = _manifest(tmp_path, "sensor,label,split", lines)

    source = load_source(f"manifest:{path}", PREP, lenient=True)
    assert len(source.pool) == 5  # no training row is held out in place of the skipped test rows
    with pytest.raises(DataError, match=r"every split=test row \(2\) was skipped by lenient loading \(NaN or infinite values: 2\)") as err:
        source.require_test()
    assert "fedmm data check" in err.value.fix


# 2. a truncated WAV is refused, as a truncated .npy is
def test_a_truncated_wav_is_refused_with_what_its_header_says(tmp_path: Path) -> None:
    sf.write(tmp_path / "whole.wav", np.zeros(4000, np.int16), 8000, subtype="PCM_16")
    raw = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[: 44 + 2 * 1000])  # the header still says 4000 frames
    assert load_audio(tmp_path / "whole.wav", PREP).shape == (PREP.clip_samples,)

    with pytest.raises(SampleError, match=r"truncated: its header says 4000 frames .* the file holds 1000") as err:
        load_audio(tmp_path / "cut.wav", PREP)
    assert err.value.reason == SkipReason.UNDECODABLE_AUDIO and "again" in err.value.fix

    path = _manifest(tmp_path, "audio,label", ["whole.wav,a", "cut.wav,b", "whole.wav,b"])
    report = check_manifest(path, PREP)
    assert [(p.row, p.file) for p in report.problems] == [(3, "cut.wav")]
    with pytest.raises(DataError, match="truncated"):
        avmnist.read_clip(tmp_path / "cut.wav")


# 3. skips counted per site; a site whose rows were all skipped is named
def test_skips_are_counted_per_site_and_a_site_with_every_row_skipped_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fedmm.data.partition import FederationPlan, build_federation
    from fedmm.data.sources import load_source

    lines = []
    for i in range(12):
        site = "abc"[i % 3]
        bad = (site == "a" and i == 0) or (site == "c")
        lines.append(f"{_series(tmp_path, f's{i}.npy', (3, 20), nan=bad, seed=i)},{'xy'[i % 2]},{site},train")
    lines += [f"{_series(tmp_path, f't{i}.npy', (3, 20), seed=50 + i)},{'xy'[i % 2]},a,test" for i in range(2)]
    path = _manifest(tmp_path, "sensor,label,site,split", lines)

    with caplog.at_level(logging.WARNING):
        source = load_source(f"manifest:{path}", PREP, lenient=True)
    assert "site 'c' has no training row left: all 4 of its training rows were skipped (NaN or infinite values: 4)" in caplog.text
    assert source.skipped_by_site == {"a": {SkipReason.NON_FINITE: 1}, "c": {SkipReason.NON_FINITE: 4}}

    federation = build_federation(source, FederationPlan())
    summary = federation.summary()
    assert federation.names == ("a", "b")
    assert summary["sites"]["a"]["skipped"] == {SkipReason.NON_FINITE: 1} and summary["sites"]["b"]["skipped"] == {}
    assert summary["sites_all_rows_skipped"] == {"c": {SkipReason.NON_FINITE: 4}}
    assert summary["skipped_while_loading"] == {SkipReason.NON_FINITE: 5}


# 4. a recording of an unknown speaker is not dropped without a word
def test_a_recording_of_an_unknown_speaker_is_warned_with_its_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "fsdd" / "recordings"
    folder.mkdir(parents=True)
    for rec in avmnist.list_recordings(avmnist.builtin_root(), "george")[:2]:
        shutil.copy(rec.path, folder / rec.path.name)
    shutil.copy(rec.path, folder / "0_alice_5.flac")
    (folder / "notes.txt").write_text("not a recording")

    with caplog.at_level(logging.WARNING):
        assert avmnist.unused_recordings(tmp_path) == ("0_alice_5.flac",)
    assert "1 recording(s) are of no FSDD speaker" in caplog.text and "0_alice_5.flac" in caplog.text and "manifest" in caplog.text


# 5. one very long series: sensor-length=auto pads everything to it, with a warning naming it
def test_one_very_long_series_is_named_with_the_median_and_a_sensor_length(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [f"{_series(tmp_path, f's{i}.npy', (3, 500 if i == 2 else 20), seed=i)},{'ab'[i % 2]}" for i in range(6)]
    path = _manifest(tmp_path, "sensor,label", lines)

    with caplog.at_level(logging.WARNING):
        ds = load_manifest(path, PREP)
    assert ds.schema.modality("sensor").shape == (3, 500)
    assert "row 4 (column 'sensor', 500 steps)" in caplog.text and "median of 20 steps" in caplog.text and "sensor-length=20" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_manifest(path, Preprocessing(sensor_length=20))
    assert "median" not in caplog.text  # a fixed sensor-length pads nothing: only the cut is warned


# 6. duplicates and train/test overlap
def test_data_check_warns_of_repeated_files_and_of_train_test_overlap(tmp_path: Path) -> None:
    for i in range(4):
        _series(tmp_path, f"s{i}.npy", (3, 20), seed=i)
    shutil.copy(tmp_path / "s1.npy", tmp_path / "copy.npy")
    lines = ["s0.npy,a,train", "s1.npy,b,train", "s2.npy,a,train", "s3.npy,b,test", "s0.npy,a,test", "copy.npy,b,test", "s2.npy,a,train"]
    report = check_manifest(_manifest(tmp_path, "sensor,label,split", lines), PREP)

    text = "\n".join(report.warnings)
    assert report.dataset is not None and len(report.dataset) == 7
    assert "1 files are used by both train and test rows (1 test rows; e.g. s0.npy in rows 2 (train), 6 (test))" in text
    assert "s2.npy in rows 4 (train), 8 (train)" in text
    assert "same content as a file of another name" in text and "s1.npy = copy.npy" in text


def test_the_cli_prints_the_warnings(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedmm.cli import app

    for i in range(2):
        _series(tmp_path, f"s{i}.npy", (3, 20), seed=i)
    path = _manifest(tmp_path, "sensor,label,split", ["s0.npy,a,train", "s1.npy,b,train", "s0.npy,a,test"])
    result = CliRunner().invoke(app, ["data", "check", str(path)])
    assert result.exit_code == 0 and "warning:" in result.output and "both train and test rows" in result.output


# 7. messages: the root is the parent; a fix that works
def test_a_basicmotions_or_avmnist_subfolder_passed_as_the_root_names_the_parent(tmp_path: Path) -> None:
    from fedmm.data.sources import load_source

    (tmp_path / "basicmotions").mkdir()
    (tmp_path / "basicmotions" / "BasicMotions_TRAIN.ts").write_text("")
    with pytest.raises(ConfigError, match="it is the basicmotions folder itself") as err:
        load_source(f"basicmotions:{tmp_path / 'basicmotions'}", PREP)
    assert f"data='basicmotions:{tmp_path.resolve()}'" in str(err.value)

    (tmp_path / "fsdd" / "recordings").mkdir(parents=True)
    (tmp_path / "mnist").mkdir()
    for sub in ("fsdd", "fsdd/recordings", "mnist"):
        with pytest.raises(ConfigError, match="subfolder of the data root") as err:
            avmnist.resolve_root(f"avmnist:{tmp_path / sub}")
        assert f"data='avmnist:{tmp_path.resolve()}'" in str(err.value)
    assert avmnist.resolve_root(f"avmnist:{tmp_path}") == tmp_path.resolve()


def test_a_missing_speaker_gets_a_fix_that_works(tmp_path: Path) -> None:
    folder = tmp_path / "fsdd" / "recordings"
    folder.mkdir(parents=True)
    rec = avmnist.list_recordings(avmnist.builtin_root(), "george")[0]
    shutil.copy(rec.path, folder / rec.path.name)

    with pytest.raises(DataError, match="no recording of speaker 'theo'") as err:
        avmnist.list_recordings(tmp_path, "theo")
    assert "sites" not in err.value.fix and "add theo's recordings" in err.value.fix and "manifest" in err.value.fix


# 8. a misspelt label, a capitalised or semicolon-separated header: each pointed out
def test_a_rare_label_close_to_a_common_one_is_pointed_out_as_a_likely_typo(tmp_path: Path) -> None:
    lines = [f"{_series(tmp_path, f's{i}.npy', (3, 20), seed=i)},{'Walking' if i % 2 else 'Running'},train" for i in range(8)]
    lines.append(f"{_series(tmp_path, 'x.npy', (3, 20), seed=99)},Walkng,train")
    path = _manifest(tmp_path, "sensor,label,split", lines)

    notes = check_manifest(path, PREP).notes

    assert any("class 'Walkng' has 1 record(s) and its name is close to 'Walking' (4): a typo?" in n for n in notes)
    (tmp_path / "without").mkdir()
    for name in [f"s{i}.npy" for i in range(8)]:
        shutil.copy(tmp_path / name, tmp_path / "without" / name)
    assert not any("typo" in n for n in check_manifest(_manifest(tmp_path / "without", "sensor,label,split", lines[:-1]), PREP).notes)


@pytest.mark.parametrize(("header", "hint"), [("sensor,Label,split", "its header has 'Label': column names are lower case"),
                                               ("sensor;label;split", "separated by ';', not commas")])
def test_a_header_nearly_right_says_what_is_wrong_with_it(tmp_path: Path, header: str, hint: str) -> None:
    sep = ";" if ";" in header else ","
    path = _manifest(tmp_path, header, [sep.join([_series(tmp_path, "s.npy", (3, 20)), "a", "train"])])

    with pytest.raises(DataError, match="its first line has") as error:
        load_manifest(path, PREP)
    assert hint in error.value.local_message and hint not in str(error.value)  # the header's text stays local
