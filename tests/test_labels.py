"""Labels have one canonical form, and errors name rows as a spreadsheet numbers them (issue 17)."""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import pytest

from fedmm.data.manifest import load_manifest, write_manifest
from fedmm.data.preprocess import Preprocessing, SkipReason
from fedmm.errors import ConfigError, DataError

PREP = Preprocessing()


def _rows(labels: list[str]) -> list[dict[str, str]]:
    return [{"tabular:x": str(i), "label": label} for i, label in enumerate(labels)]


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("1", "1"), ("01", "1"), ("1.0", "1"), (" 1 ", "1"), ("+1", "1"), ("1e0", "1"), ("-0", "0"), ("007", "7"),
        ("1.50", "1.5"), ("-2.25", "-2.25"), ("12345678901234567890", "12345678901234567890"),
        ("cat", "cat"), (" Cat ", "Cat"), ("e1", "e1"), ("1_000", "1_000"), ("inf", "inf"), ("0x10", "0x10"),
        (unicodedata.normalize("NFD", "café"), "café"),
        ("", None), ("  ", None), ("NaN", None), ("nan", None), ("null", None), ("NULL", None), ("None", None),
    ],
)
def test_canonical_label(raw: str, canonical: str | None) -> None:
    from fedmm.data.labels import canonical_label

    assert canonical_label(raw) == canonical


def test_numeric_spellings_are_one_class_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fedmm.data.manifest import check_manifest

    path = write_manifest(tmp_path / "m.csv", _rows(["1", "01", "1.0", "2", "2", "1"]))

    with caplog.at_level(logging.WARNING, logger="fedmm.data"):
        ds = load_manifest(path, PREP)
    report = check_manifest(path, PREP)

    assert ds.schema.classes == ("1", "2") and ds.label.tolist() == [0, 0, 0, 1, 1, 0]
    assert any("'01'" in note and "'1.0'" in note and "'1'" in note for note in report.notes), report.notes
    assert any("'01'" in r.getMessage() for r in caplog.records)


def test_nfc_and_nfd_spellings_are_one_class(tmp_path: Path) -> None:
    nfc, nfd = unicodedata.normalize("NFC", "Müller"), unicodedata.normalize("NFD", "Müller")
    assert nfc != nfd
    ds = load_manifest(write_manifest(tmp_path / "m.csv", _rows([nfc, nfd, "other"])), PREP)

    assert ds.schema.classes == (nfc, "other") and ds.label.tolist() == [0, 0, 1]


def test_nan_null_and_none_labels_are_missing_labels(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", _rows(["a", "NaN", "null", "None", "b", "  "]))

    with pytest.raises(DataError, match=r"row 3, column 'label'.*no label"):
        load_manifest(path, PREP)
    ds = load_manifest(path, PREP, lenient=True)
    assert ds.schema.classes == ("a", "b") and ds.skipped == {SkipReason.MISSING_LABEL: 4}


def test_configured_classes_are_canonical_too(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.csv", _rows(["1", "2.0", "02"]))

    ds = load_manifest(path, PREP, classes=("01", "2"))
    assert ds.schema.classes == ("1", "2") and ds.label.tolist() == [0, 1, 1]
    with pytest.raises(ConfigError, match="same class"):
        load_manifest(path, PREP, classes=("1", "1.0", "2"))
    with pytest.raises(ConfigError, match="missing label"):
        load_manifest(path, PREP, classes=("1", "NaN"))


def test_parquet_numbers_as_labels(tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"tabular:x": [1.0, 2.0, 3.0], "label": [1.0, 2.0, float("nan")]}).to_parquet(tmp_path / "m.parquet")

    ds = load_manifest(tmp_path / "m.parquet", PREP, lenient=True)
    assert ds.schema.classes == ("1", "2") and ds.skipped == {SkipReason.MISSING_LABEL: 1}


def test_blank_lines_do_not_shift_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    # rows as a spreadsheet shows them: 1 header, 2 good, 3 blank, 4 good, 5 blank, 6 blank, 7 bad
    path.write_text("tabular:x,label\n1,a\n\n2,b\n\n\nthree,a\n")

    with pytest.raises(DataError, match=r"row 7, column 'tabular:x'"):
        load_manifest(path, PREP)
    ds = load_manifest(path, PREP, lenient=True)
    assert ds.ids == ("row 2", "row 4")


def test_a_quoted_cell_over_two_lines_is_one_row(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text('text,label\n"two\nlines",a\nok,\n')

    with pytest.raises(DataError, match=r"row 3, column 'label'"):
        load_manifest(path, PREP)


def test_a_row_with_too_many_cells_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("tabular:x,label\n1,a\n2,b,extra\n3,a\n")

    with pytest.raises(DataError, match=r"row 3: has 3 cells, the header has 2"):
        load_manifest(path, PREP)
    assert len(load_manifest(path, PREP, lenient=True)) == 2


def test_a_row_cut_short_is_named_not_read_with_empty_cells(tmp_path: Path) -> None:
    """New-user finding of 3 Dec: a manifest cut mid-line (an interrupted copy) ending 'x.npy,Badminton,clin' was read with
    an empty last cell, and 'clin' became a site of one record."""
    path = tmp_path / "m.csv"
    path.write_text("tabular:x,label,site,split\n1,a,clinic0,train\n2,b,clinic0,train\n3,a,clin")

    with pytest.raises(DataError, match=r"row 4: has 3 cells, the header has 4: it was cut short.*Fix: complete the row"):
        load_manifest(path, PREP)
    ds = load_manifest(path, PREP, lenient=True)
    assert len(ds) == 2 and set(ds.groups["site"]) == {"clinic0"}
