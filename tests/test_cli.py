"""The fedmm command's parsing and early errors (no simulation is started)."""

from __future__ import annotations

from typer.testing import CliRunner

from fedmm.cli import app, parse_overrides


def test_overrides_parse_as_toml_values() -> None:
    assert parse_overrides(["dp=false", "target-delta=1e-5", "accountant=rdp"]) == {
        "dp": False, "target-delta": 1e-5, "accountant": "rdp",
    }


def test_unknown_key_exits_2_before_starting_anything() -> None:
    result = CliRunner().invoke(app, ["simulate", "--set", "roundz=3"])

    assert result.exit_code == 2
    assert "roundz" in result.output and "rounds" in result.output


def test_bad_epsilon_exits_2() -> None:
    result = CliRunner().invoke(app, ["simulate", "--set", "target-epsilon=-1"])

    assert result.exit_code == 2
    assert "target-epsilon" in result.output


def test_too_many_sites_and_a_missing_data_folder_exit_2() -> None:
    too_many = CliRunner().invoke(app, ["simulate", "--set", "sites=7"])
    missing = CliRunner().invoke(app, ["simulate", "--set", "data=avmnist:/no/such/folder"])

    assert too_many.exit_code == 2 and "'sites'" in too_many.output and "7" in too_many.output
    assert missing.exit_code == 2 and "/no/such/folder" in missing.output
