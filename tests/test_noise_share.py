"""Distributed client-level noise against SecAgg+'s clip range: never truncated unseen.

Each site adds its share ``N(0, sigma^2 S^2 / t)`` to its clipped update and then clips
every value to ``+-secagg-clip-range`` before quantising. A share whose std approaches the
range is itself truncated, and the sum carries less noise than accounted; the plan refuses
such a range, and the smallest range it allows delivers the accounted std.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmm.config import RunConfig
from fedmm.errors import ConfigError, PrivacyError
from fedmm.plan import RunPlan
from fedmm.privacy.client_dp import (
    SHARE_TRUNCATION_Z, fewest_noise_parties, noise_share_std, secagg_threshold, share_truncation_probability,
)
from fedmm.secure.params import SecAggParams
from fedmm.secure.update import prepare_update

QUANTISATION = 2**22  # Flower's default quantization_range (SecAggParams.target_range)


def _distributed(**changes: object) -> dict[str, object]:
    return {"sites": 6, "secure-aggregation": True, "client-dp": True, "client-noise": "distributed", **changes}


def test_a_range_that_truncates_the_noise_share_is_refused() -> None:
    # sigma 10, S 1, a round of 2 sites (threshold 2): each share has std 7.07 against the default
    # range 8, so about a quarter of its values are clipped and the sum is under-noised.
    settings = _distributed(**{"client-noise-multiplier": 10.0})
    share = 10.0 / math.sqrt(2)
    draws = np.random.default_rng(0).normal(0.0, share, 200_000)
    assert np.std(np.clip(draws, -8.0, 8.0)) / share < 0.8  # what used to leave the sites
    cfg = RunConfig.from_run_config(settings)  # each value on its own is well-formed

    with pytest.raises(ConfigError) as err:
        RunPlan.from_config(cfg)

    message = str(err.value)
    assert "'secagg-clip-range'" in message and "(got 8.0)" in message and "Fix:" in message
    assert "7.07" in message and f"{1 + SHARE_TRUNCATION_Z * share:.4g}" in message  # the share std and the bound


def test_the_worst_case_share_is_the_fewest_parties_a_released_round_can_have() -> None:
    # Flower's SecAgg+ threshold for a round of n sampled sites (fractions: max(2, round(f * shares))).
    assert secagg_threshold(1.0, 0.67, 10) == 7 and secagg_threshold(1.0, 0.67, 2) == 2 and secagg_threshold(1.0, 4.0, 10) == 4
    assert fewest_noise_parties(RunConfig.from_run_config(_distributed())) == 2  # a round of 2 sites can be unmasked
    assert fewest_noise_parties(RunConfig.from_run_config(_distributed(**{"min-sites": 6}))) == 4  # round(0.67 * 6)
    assert fewest_noise_parties(RunConfig.from_run_config(_distributed(**{"secagg-threshold": 3.0}))) == 3
    plan = RunPlan.from_run_config(_distributed(**{"client-noise-multiplier": 2.0, "client-clip-norm": 0.5}))
    assert plan.client_dp is not None and plan.client_dp.share is not None
    share = plan.client_dp.share
    assert share.parties == 2 and share.std == pytest.approx(2.0 * 0.5 / math.sqrt(2))
    assert share.bound == pytest.approx(0.5 + SHARE_TRUNCATION_Z * share.std) and share.clip_range == 8.0 and share.ok
    assert share_truncation_probability() == pytest.approx(1.97e-9, rel=0.01)
    assert RunPlan.from_run_config({"client-dp": True}).client_dp.share is None  # type: ignore[union-attr]  # central noise


def test_the_smallest_allowed_range_delivers_the_accounted_share_std() -> None:
    base = RunConfig.from_run_config(_distributed(**{"client-noise-multiplier": 3.0}))
    with pytest.raises(ConfigError, match="secagg-clip-range"):  # sigma 3 needs more than the default 8
        RunPlan.from_config(base)
    parties = fewest_noise_parties(base)
    floor = 1.0 + SHARE_TRUNCATION_Z * 3.0 / math.sqrt(parties)
    with pytest.raises(ConfigError, match="secagg-clip-range"):
        RunPlan.from_config(base.replace(secagg_clip_range=floor * 0.999))
    cfg = base.replace(secagg_clip_range=floor)
    plan = RunPlan.from_config(cfg).client_dp  # allowed: exactly at the bound
    assert plan is not None and plan.share is not None and plan.share.ok and plan.share.bound == pytest.approx(floor)
    params = SecAggParams(clip_range=floor, max_weight=1.0, target_range=QUANTISATION, threshold=parties)
    zeros = {"w": np.zeros(250_000, np.float32)}
    sent = [prepare_update({"w": torch.zeros(250_000)}, zeros, cfg, weight=1, secagg=params) for _ in range(4)]

    values = np.concatenate([out.arrays["w"].astype(np.float64) for out in sent])
    accounted = noise_share_std(plan, parties)
    assert all(out.noise_std == pytest.approx(accounted) for out in sent)
    assert np.std(values) == pytest.approx(accounted, rel=0.01)
    assert sum(out.clipped_values for out in sent) == 0


def test_a_site_refuses_to_send_a_share_the_rounds_range_would_truncate() -> None:
    # The server's SecAgg+ setup decides the range and threshold the site sees: checked again there.
    cfg = RunConfig.from_run_config(_distributed())
    params = SecAggParams(clip_range=2.0, max_weight=1.0, target_range=QUANTISATION, threshold=2)
    zeros = {"w": np.zeros(10, np.float32)}

    with pytest.raises(PrivacyError, match="clip range 2.*share std 0.707"):
        prepare_update({"w": torch.zeros(10)}, zeros, cfg, weight=1, secagg=params, site="george")


def test_fedmm_plan_prints_the_share_check_and_refuses_a_truncating_range() -> None:
    from typer.testing import CliRunner

    from fedmm.cli import app

    base = ["plan", "--set", "dp=false", "--set", "data=synthetic:60", "--set", "secure-aggregation=true", "--set", "client-dp=true",
            "--set", "client-noise=distributed"]
    ok = CliRunner().invoke(app, base)
    refused = CliRunner().invoke(app, [*base, "--set", "client-noise-multiplier=10"])

    text = " ".join(ok.output.split())
    assert ok.exit_code == 0, ok.output
    assert "share: std up to 0.7071" in text and "= 5.243" in text and "secagg-clip-range 8: ok" in text
    assert refused.exit_code == 2 and "secagg-clip-range" in refused.output and "43.43" in refused.output
