"""RunConfig: parsing, range checks and clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmm.config import AccountantKind, RunConfig
from fedmm.errors import ConfigError
from fedmm.plan import RunPlan


def test_pyproject_defaults_are_the_runconfig_defaults() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]

    assert RunConfig.from_run_config(declared) == RunConfig()
    assert set(declared) == set(RunConfig.keys())


def test_round_trip_through_run_config() -> None:
    cfg = RunConfig(rounds=3, dp=False, noise_multiplier=1.5, accountant=AccountantKind.RDP)

    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


def test_unknown_key_names_the_key_and_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({"target-epsilom": 3.0})

    assert "'target-epsilom'" in str(err.value)
    assert "did you mean 'target-epsilon'" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("target-epsilon", 0.0, "must be > 0"),
        ("target-epsilon", -1.0, "must be > 0"),
        ("target-delta", 0.0, "open interval (0, 1)"),
        ("target-delta", 1.0, "open interval (0, 1)"),
        ("target-delta", 1.5, "open interval (0, 1)"),
        ("noise-multiplier", -0.5, "must be a finite number >= 0"),
        ("max-grad-norm", 0.0, "must be > 0"),
        ("rounds", 0, "must be >= 1"),
        ("accountant", "moments", "must be one of: rdp, prv"),
        ("dp", "maybe", "must be true or false"),
        ("rounds", 2.5, "must be an integer"),
    ],
)
def test_bad_values_are_refused_with_key_value_and_fix(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({key: value})

    message = str(err.value)
    assert f"'{key}'" in message
    assert expected in message
    assert repr(value) in message
    assert "Fix:" in message


def test_noise_multiplier_auto_means_calibrated() -> None:
    assert RunConfig.from_run_config({"noise-multiplier": "auto"}).noise_multiplier is None
    assert RunConfig.from_run_config({"noise-multiplier": 1}).noise_multiplier == 1.0


def test_every_preset_is_a_valid_run_config() -> None:
    import tomllib

    presets = sorted((Path(__file__).resolve().parents[1] / "simulations").glob("*.toml"))
    assert len(presets) >= 6
    for preset in presets:
        RunPlan.from_run_config(tomllib.loads(preset.read_text()))


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"secagg-shares": 2.5}, "secagg-shares"),
        ({"secagg-shares": 12.0, "sites": 6}, "secagg-shares"),
        ({"secagg-shares": 5.0, "secagg-threshold": 5.0}, "secagg-threshold"),
        ({"secagg-threshold": 0.0}, "secagg-threshold"),
        ({"secagg-clip-range": -1.0}, "secagg-clip-range"),
        ({"secure-aggregation": True, "sites": 1}, "sites"),
        ({"client-noise": "local"}, "client-noise"),
        ({"client-dp": True, "client-noise": "distributed"}, "client-noise"),
        ({"client-fraction": 0.0}, "client-fraction"),
        ({"client-noise-multiplier": 0.0}, "client-noise-multiplier"),
        ({"client-delta": 1.0}, "client-delta"),
    ],
)
def test_secure_aggregation_and_client_dp_settings_are_range_checked(settings: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        RunConfig.from_run_config(settings)


def test_min_sites_above_sites_is_refused_before_any_site_spends() -> None:
    # Every site would train (and spend its budget) and every update be discarded below min-sites.
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({"sites": 3, "min-sites": 4})

    message = str(err.value)
    assert "'min-sites'" in message and "(got 4)" in message and "sites=3" in message and "Fix:" in message
    assert RunConfig.from_run_config({"sites": 3, "min-sites": 3}).min_sites == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [("seed", -1), ("seed", 2**40), ("image-size", 200000), ("learning-rate", 1e308), ("audio-seconds", 1e9), ("sensor-length", 10**9), ("text-buckets", 2**40)],
)
def test_values_that_would_crash_a_run_are_refused_up_front(key: str, value: object) -> None:
    """Issue 17: seed=-1 gave a 4451-line ValueError, image-size=200000 a MemoryError, learning-rate=1e308 a failure inside Ray."""
    with pytest.raises(ConfigError, match=f"config key '{key}': must be in"):
        RunConfig.from_run_config({key: value})
