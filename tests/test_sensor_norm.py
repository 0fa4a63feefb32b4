"""Sensor normalisation that keeps the signal (sensor-norm), sensor-length=auto and sites=auto."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmm.config import RunConfig
from fedmm.data.normalise import SensorNorm, normalise, scale_warnings
from fedmm.data.partition import FederationPlan, build_federation
from fedmm.data.preprocess import Preprocessing
from fedmm.data.schema import STATS_SERIES, Modality, ModalityKind, MultimodalDataset, Schema
from fedmm.data.sources import load_source
from fedmm.errors import ConfigError
from fedmm.models import ModelOptions, ModelRecipe
from fedmm.plan import RunPlan


def _series(values: np.ndarray) -> MultimodalDataset:
    n, c, t = values.shape
    schema = Schema((Modality("accelerometer", ModalityKind.SENSOR, (c, t), "series"),), ("lying", "standing"))
    return MultimodalDataset(schema, {"accelerometer": values.astype(np.float32)}, np.ones((n, 1), bool), np.arange(n) % 2)


def _lying_and_standing() -> MultimodalDataset:
    """Two windows with the same movement, gravity on another axis: only the offset tells them apart."""
    rng = np.random.default_rng(0)
    wiggle = 0.05 * rng.normal(size=(3, 128))
    lying, standing = wiggle.copy(), wiggle.copy()
    lying[2] += 1.0  # gravity (in g) on z
    standing[0] += 1.0  # on x
    return _series(np.stack([lying, standing]))


def test_window_standardisation_deletes_the_offset_that_none_and_window_stats_keep() -> None:
    data = _lying_and_standing()
    window = normalise(data, sensor_norm="window", site_statistics=False).features["accelerometer"]
    assert np.allclose(window[0], window[1], atol=1e-4)  # the old behaviour: the two classes look the same
    for mode in ("none", "window-stats"):
        kept = normalise(data, sensor_norm=mode, site_statistics=False).features["accelerometer"]
        assert not np.allclose(kept[0], kept[1], atol=0.5), mode
    stats = normalise(data, sensor_norm="window-stats", site_statistics=False)
    assert stats.schema.modality("accelerometer").shape == (9, 128)
    assert stats.schema.modality("accelerometer").representation == STATS_SERIES
    means = stats.features["accelerometer"][:, 3:6, 0]
    assert np.allclose(means[0], np.arcsinh([0, 0, 1]), atol=0.05) and np.allclose(means[1], np.arcsinh([1, 0, 0]), atol=0.05)


def test_every_mode_but_site_uses_only_the_record_itself() -> None:
    """DP-SGD's guarantee needs a record's features to depend on that record alone."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5, 3, 50))
    changed = base.copy()
    changed[4] *= 1000.0  # another record changes wildly
    for mode in ("none", "scale=9.81", "window", "window-stats"):
        a = normalise(_series(base), sensor_norm=mode, site_statistics=False).features["accelerometer"][:4]
        b = normalise(_series(changed), sensor_norm=mode, site_statistics=False).features["accelerometer"][:4]
        assert np.array_equal(a, b), mode
    a = normalise(_series(base), sensor_norm="site", site_statistics=True).features["accelerometer"][:4]
    b = normalise(_series(changed), sensor_norm="site", site_statistics=True).features["accelerometer"][:4]
    assert not np.array_equal(a, b)  # site statistics do mix records: under DP only noisy, accounted ones (test_site_stats_dp.py)


def test_bad_settings_are_named() -> None:
    RunPlan.from_run_config({"sensor-norm": "site"})  # under DP too: noisy statistics, accounted (tests/test_site_stats_dp.py)
    RunPlan.from_run_config({"sensor-norm": "site", "dp": False})
    for bad, match in (("wobble", "unknown mode 'wobble'"), ("scale=0", "positive"), ("scale=x", "positive"), ("a:none,a:window", "given twice")):
        with pytest.raises(ConfigError, match=match):
            SensorNorm.parse(bad)
    with pytest.raises(ConfigError, match="no sensor column named gyro"):
        normalise(_lying_and_standing(), sensor_norm="gyro:none", site_statistics=False)
    norm = SensorNorm.parse("accelerometer:scale=9.81,*:window")
    assert norm.mode("accelerometer") == "scale=9.81" and norm.mode("gyroscope") == "window"
    assert SensorNorm.parse(norm.text) == norm


def test_values_far_from_unit_scale_are_named_with_a_fix() -> None:
    loud = _series(np.full((2, 3, 10), 4000.0))
    (warning,) = scale_warnings(loud)
    assert "'accelerometer'" in warning and "4e+03" in warning and "scale=4e+03" in warning
    assert scale_warnings(_lying_and_standing()) == []
    assert scale_warnings(loud, "window") == []


@pytest.mark.parametrize("encoder", ["cnn", "gru"])
def test_the_sensor_encoders_take_window_statistics_past_their_convolutions(encoder: str) -> None:
    data = normalise(_lying_and_standing(), sensor_norm="window-stats", site_statistics=False)
    recipe = ModelRecipe("concat", ModelOptions(width=8, sensor_encoder=encoder))
    model = recipe.build(recipe.prepare(data).schema)
    sensor = model.encoders[0]
    assert (sensor.channels, sensor.stats) == (3, 6)
    out = model(torch.from_numpy(data.features["accelerometer"]), torch.ones(2, 1))
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_basicmotions_keeps_its_length_unless_told_and_a_cut_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    auto = load_source("basicmotions", Preprocessing())
    assert auto.pool.schema.modality("accelerometer").shape == (3, 100)
    with caplog.at_level("WARNING"):
        cut = load_source("basicmotions", Preprocessing(sensor_length=64))
    assert cut.pool.features["accelerometer"].shape[2] == 64 and "sensor-length=64 cuts every one" in caplog.text
    plan = RunPlan.from_run_config({"data": "basicmotions"})
    schema = normalise(auto.require_test(), site_statistics=False).schema
    assert plan.resolved(schema=schema).sensor_length == 100


def test_sites_auto_uses_every_natural_group_and_the_default_count_otherwise() -> None:
    cfg = RunConfig()
    assert cfg.sites is None
    avmnist = build_federation(load_source("avmnist", Preprocessing()), FederationPlan.from_config(cfg))
    assert len(avmnist.names) == 6 and avmnist.plan.sites == 6 and avmnist.unassigned == 0
    iid = build_federation(load_source("basicmotions", Preprocessing()), FederationPlan.from_config(cfg))  # no natural groups
    assert len(iid.names) == 6
    fewer = build_federation(load_source("avmnist", Preprocessing()), FederationPlan.from_config(cfg.replace(sites=4)))
    assert len(fewer.names) == 4 and fewer.unassigned > 0
    plan = RunPlan.from_config(cfg).with_sites(6)
    assert plan.config.sites == 6 and plan.resolved(sites=6).sites == 6
    with pytest.raises(ConfigError, match="min-sites"):
        RunPlan.from_config(cfg.replace(min_sites=8)).with_sites(6)
