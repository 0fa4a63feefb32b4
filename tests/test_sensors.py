"""BasicMotions and the .ts reader: real files, and real files broken on purpose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmm.data.sensors import BASICMOTIONS_MODALITIES, load_basicmotions, read_ts
from fedmm.errors import DataError


def test_basicmotions_shapes_and_classes(shared_data: Path) -> None:
    train, test = load_basicmotions(shared_data)

    for split in (train, test):
        assert split.values.shape == (40, 6, 100) and split.values.dtype == np.float32
        assert split.class_names == ("Standing", "Running", "Walking", "Badminton")
        assert np.bincount(split.label_ids).tolist() == [10, 10, 10, 10]
        assert np.isfinite(split.values).all()
    assert {k: train.values[:, v].shape[1] for k, v in BASICMOTIONS_MODALITIES.items()} == {"accelerometer": 3, "gyroscope": 3}


def test_first_value_matches_the_file(shared_data: Path) -> None:
    train, _ = load_basicmotions(shared_data)

    assert train.values[0, 0, :3].tolist() == pytest.approx([0.079106, 0.079106, -0.903497])


def _broken(shared_data: Path, tmp_path: Path, edit) -> Path:
    lines = (shared_data / "basicmotions" / "BasicMotions_TRAIN.ts").read_text().splitlines()
    data_at = next(i for i, line in enumerate(lines) if line.strip().lower() == "@data")
    edit(lines, data_at + 1)
    path = tmp_path / "broken.ts"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda lines, i: lines.__setitem__(i, lines[i].replace("0.079106", "NaN", 1)), "NaN or infinite"),
        (lambda lines, i: lines.__setitem__(i, lines[i].replace("0.079106", "abc", 1)), "not a number"),
        (lambda lines, i: lines.__setitem__(i, lines[i].rsplit(":", 1)[0] + ":Swimming"), "label 'Swimming', declared"),
        (lambda lines, i: lines.__setitem__(i, lines[i].split(":", 1)[1]), "has 5 dimensions, the header declares 6"),
        (lambda lines, i: lines.__setitem__(i, lines[i].replace("0.079106,", "", 1)), "has 99 values"),
    ],
)
def test_a_broken_line_names_file_and_line(shared_data: Path, tmp_path: Path, edit, expected: str) -> None:
    path = _broken(shared_data, tmp_path, edit)
    first_data_line = 1 + next(i for i, line in enumerate(path.read_text().splitlines()) if line.strip().lower() == "@data") + 1

    with pytest.raises(DataError) as err:
        read_ts(path)
    assert f"{path.name}:{first_data_line}" in str(err.value) and str(tmp_path) not in str(err.value)  # what a site may send
    assert expected in err.value.local_message and str(path) in err.value.local_message  # the site's own log


def test_a_line_s_values_stay_in_the_local_detail(tmp_path: Path) -> None:
    path = tmp_path / "secret.ts"
    path.write_text("@dimensions 1\n@seriesLength 2\n@classLabel true a b\n@data\n1,patient-4711:a\n0.5,0.25:hunter2\n")

    with pytest.raises(DataError) as err:
        read_ts(path)
    assert "patient-4711" not in str(err.value) and "patient-4711" in err.value.local_message
    path.write_text("@dimensions 1\n@seriesLength 2\n@classLabel true a b\n@data\n0.5,0.25:hunter2\n")
    with pytest.raises(DataError, match=r"secret.ts:5: the label is not one of the 2 declared") as err:
        read_ts(path)
    assert "hunter2" not in str(err.value) and "hunter2" in err.value.local_message


def test_missing_file_and_missing_data_section(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_ts(tmp_path / "nope.ts")
    header_only = tmp_path / "header.ts"
    header_only.write_text("@problemName X\n@dimensions 1\n@seriesLength 2\n@classLabel true a b\n")
    with pytest.raises(DataError, match="no @data line"):
        read_ts(header_only)
