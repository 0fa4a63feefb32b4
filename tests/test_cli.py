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


def test_augmentation_or_model_that_do_not_fit_the_data_exit_2_before_flower() -> None:
    wrong_kind = CliRunner().invoke(app, ["simulate", "--set", "augment=sensor:jitter"])
    geometric = CliRunner().invoke(app, ["simulate", "--set", "augment=image:rotate"])  # AV-MNIST images are scattering maps by default
    wrong_model = CliRunner().invoke(app, ["simulate", "--set", "data=basicmotions", "--set", "sites=4", "--set", "model=embedding"])

    assert wrong_kind.exit_code == 2 and "augment" in wrong_kind.output
    assert geometric.exit_code == 2 and "pixels" in geometric.output
    assert wrong_model.exit_code == 2 and "embedding" in wrong_model.output and "pretrained" in wrong_model.output


def test_data_split_prints_per_site_counts() -> None:
    result = CliRunner().invoke(
        app, ["data", "split", "--set", "data=synthetic:300", "--set", "partitioner=pathological", "--set", "sites=3"], env={"COLUMNS": "200"}
    )

    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output and "site-2" in result.output and "held by no site" in result.output
