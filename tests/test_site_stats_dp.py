"""sensor-norm=site under DP: noisy site statistics, accounted and recorded like any other spend."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedmm.config import AccountantKind, RunConfig
from fedmm.data.normalise import (
    SiteStatistics,
    noisy_site_statistics,
    normalise,
    site_columns,
    site_stat_contributions,
)
from fedmm.data.partition import build_federation
from fedmm.data.schema import MultimodalDataset
from fedmm.data.sources import load_source
from fedmm.errors import BudgetExceededError
from fedmm.plan import RunPlan
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ledger import MECHANISM, SITE_STATS_MECHANISM, PrivacyLedger
from fedmm.privacy.policy import SitePolicy
from fedmm.site import round as site_round
from fedmm.site.round import SiteState, plan_site, train_round

DELTA = 1e-5
BASE = {"data": "basicmotions", "dp": True, "sites": 1, "sensor-norm": "site", "rounds": 2}


def _site(values: dict[str, object]) -> tuple[RunConfig, MultimodalDataset, MultimodalDataset, dict[str, torch.Tensor]]:
    """The run config, the one site's data as a simulated site sees it, the server's held-out set and initial weights."""
    plan = RunPlan.from_run_config(values)
    cfg = plan.config
    source = load_source(cfg.data, plan.preprocessing, classes=cfg.class_list, test_fraction=cfg.test_fraction)
    federation = build_federation(source, plan.federation)
    test = normalise(source.require_test(), sensor_norm=cfg.sensor_norm, site_statistics=not cfg.dp, held_out=True)
    recipe = plan.model
    prepared = recipe.prepare(test, tasks_from=recipe.task_classes(test))
    weights = recipe.build(prepared.schema, seed=cfg.seed).state_dict()
    return cfg, federation.sites[0], test, weights


@pytest.fixture(scope="module")
def basic() -> tuple[RunConfig, MultimodalDataset, MultimodalDataset, dict[str, torch.Tensor]]:
    return _site(BASE)


def _t(event: object) -> tuple[float, float, int]:
    return (event.noise_multiplier, event.sample_rate, event.steps)  # type: ignore[attr-defined]


def _rdp_epsilon(history: tuple[object, ...]) -> float:
    """Opacus' own RDP accountant over a whole history."""
    reference = RDPAccountant()
    reference.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]  # type: ignore[attr-defined]
    return float(reference.get_epsilon(delta=DELTA))


def test_site_statistics_are_no_longer_refused_under_dp(basic: tuple[RunConfig, MultimodalDataset, MultimodalDataset, dict[str, torch.Tensor]]) -> None:
    # The old code refused this plan ("DP-SGD's guarantee does not cover" the site's statistics).
    plan = RunPlan.from_run_config({"sensor-norm": "site", "dp": True})
    assert plan.config.sensor_norm == "site"
    cfg, site, test, _ = basic
    raw = normalise(site, sensor_norm="none", site_statistics=False)
    # At a site under DP the column is left as read: the round standardises it with noisy, accounted statistics.
    assert np.array_equal(site.features["accelerometer"], raw.features["accelerometer"])
    assert site_columns(site, cfg.sensor_norm) == ("accelerometer", "gyroscope")
    # The server's held-out set is standardised by its own exact statistics.
    acc = test.features["accelerometer"].astype(np.float64)
    assert np.allclose(acc.mean(axis=(0, 2)), 0.0, atol=1e-4) and np.allclose(acc.std(axis=(0, 2)), 1.0, atol=1e-3)


def test_one_record_moves_the_statistics_by_at_most_the_sensitivity(basic: tuple[RunConfig, MultimodalDataset, MultimodalDataset, dict[str, torch.Tensor]]) -> None:
    _, site, _, _ = basic
    columns = ("accelerometer", "gyroscope")
    canaries = [1e30, -1e30, 3e38, -3e38, np.inf, -np.inf, np.nan, 0.0, 20.0, -20.0]
    adversarial = dict(site.features)
    n = len(site)
    for name in columns:
        values = adversarial[name].copy()
        for i, canary in enumerate(canaries):
            values[i] = canary
        values[len(canaries), :, ::2] = 3e38  # half huge, half tiny: a large mean square and mean at once
        values[len(canaries), :, 1::2] = -3e38
        adversarial[name] = values
    data = site.replace(features=adversarial)
    present = data.present.copy()
    present[n - 1, data.schema.names.index("gyroscope")] = False  # an absent column counts nothing
    data = data.replace(present=present)
    for bound in (1.0, 20.0, 1e3):
        rows = site_stat_contributions(data, columns, bound=bound)
        assert np.isfinite(rows).all()
        assert np.linalg.norm(rows, axis=1).max() <= 1.0 + 1e-12  # add/remove one record: L2 sensitivity 1
        assert np.linalg.norm(rows, axis=1).max() >= 0.9  # and the bound is nearly reached (not vacuous)
        # Neighbouring data sets (one record removed) differ by that record's row, whichever it is.
        full = rows.sum(axis=0)
        for i in range(len(canaries) + 1):
            without = site_stat_contributions(data.subset([j for j in range(n) if j != i]), columns, bound=bound).sum(axis=0)
            assert np.linalg.norm(full - without) <= 1.0 + 1e-9
    stats = noisy_site_statistics(data, columns, bound=20.0, noise_multiplier=5.0, rng=np.random.default_rng(0))
    for _, mean, std in stats.columns:
        assert all(math.isfinite(m) and abs(m) <= 20.0 for m in mean) and all(0.2 - 1e-12 <= s <= 20.0 for s in std)
    standardised = stats.apply(site)
    assert all(np.isfinite(standardised.features[c]).all() for c in columns)
    # With little noise the statistics are the clipped data's own.
    quiet = noisy_site_statistics(site, columns, bound=100.0, noise_multiplier=1e-9, rng=np.random.default_rng(0))
    acc = site.features["accelerometer"].astype(np.float64)
    assert np.allclose(quiet.columns[0][1], acc.mean(axis=(0, 2)), atol=1e-4)
    assert np.allclose(quiet.columns[0][2], acc.std(axis=(0, 2)), rtol=1e-4)
    assert SiteStatistics.from_json(stats.to_json()) == stats


def test_the_release_is_one_gaussian_entry_and_the_epsilon_covers_it(basic: tuple[RunConfig, MultimodalDataset, MultimodalDataset, dict[str, torch.Tensor]]) -> None:
    cfg, site, test, weights = basic
    state = SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
    recipe = RunPlan.from_config(cfg).model
    schema = recipe.prepare(test, tasks_from=recipe.task_classes(test)).schema.to_json()
    update = train_round(cfg=cfg, site="0", data=site, global_weights=weights, server_round=1, state=state, expected_schema=schema)
    history = state.accountant.history
    plan = state.plan
    assert plan is not None and plan.stats_noise_multiplier == cfg.site_stats_noise
    # Exactly one more entry than DP-SGD's: the statistics' (sigma, 1.0, 1), first.
    assert [_t(e) for e in history] == [(cfg.site_stats_noise, 1.0, 1), (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    assert update.privacy is not None and update.privacy.epsilon == pytest.approx(_rdp_epsilon(history), rel=1e-9)
    assert update.privacy.epsilon > SiteAccountant(cfg.accountant, history[1:]).epsilon(DELTA)  # the statistics cost something
    stats = state.site_stats
    # The second round reuses them (restored as a new client process would) and pays nothing more for them.
    state = SiteState.from_json(state.to_json())
    assert state.site_stats == stats
    update = train_round(cfg=cfg, site="0", data=site, global_weights=update.state_dict, server_round=2, state=state, expected_schema=schema)
    history = state.accountant.history
    assert [_t(e) for e in history] == [(cfg.site_stats_noise, 1.0, 1), (plan.noise_multiplier, plan.sample_rate, 2 * plan.steps_per_round)]
    assert update.privacy is not None and update.privacy.epsilon == pytest.approx(_rdp_epsilon(history), rel=1e-9)
    assert update.privacy.epsilon <= cfg.target_epsilon  # the calibration counted the statistics


def test_the_plan_counts_the_statistics_with_either_accountant() -> None:
    for kind in (AccountantKind.RDP, AccountantKind.PRV):
        cfg = RunConfig(dp=True, sensor_norm="site", rounds=5, target_epsilon=3.0, accountant=kind)
        with_stats, without = plan_site(cfg, 40), plan_site(cfg, 40, site_stats=False)
        assert with_stats.stats_noise_multiplier == cfg.site_stats_noise and without.stats_noise_multiplier == 0.0
        assert with_stats.noise_multiplier > without.noise_multiplier  # the rounds get less of the budget
        assert without.planned_epsilon <= cfg.target_epsilon and with_stats.planned_epsilon <= cfg.target_epsilon
        assert with_stats.planned_epsilon >= cfg.target_epsilon - max(0.01, 0.002 * cfg.target_epsilon) - 1e-9
        # The planned epsilon is that of the statistics and every round together.
        total = SiteAccountant(kind)
        total.record(noise_multiplier=cfg.site_stats_noise, sample_rate=1.0, steps=1)
        total.record(noise_multiplier=with_stats.noise_multiplier, sample_rate=with_stats.sample_rate, steps=cfg.rounds * with_stats.steps_per_round)
        assert with_stats.planned_epsilon == pytest.approx(total.epsilon(cfg.target_delta), rel=1e-9)


def _policy(tmp_path: Path, budget: float) -> tuple[SitePolicy, PrivacyLedger]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    policy = SitePolicy(state_dir=tmp_path, epsilon_budget=budget, delta=DELTA, min_noise_multiplier=0.5)
    return policy, PrivacyLedger.create(policy.ledger_path, site="0")


def test_a_budget_that_fits_the_round_but_not_the_statistics_is_refused_before_anything_is_used(
    basic: tuple[RunConfig, MultimodalDataset, MultimodalDataset, dict[str, torch.Tensor]], tmp_path: Path,
) -> None:
    cfg, site, _, weights = basic
    cfg = cfg.replace(noise_multiplier=1.5, rounds=1)
    plan = plan_site(cfg, len(site))
    round_only = SiteAccountant(cfg.accountant)
    round_only.record(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps_per_round)
    both = SiteAccountant(cfg.accountant, [site_round.stats_event(cfg), *round_only.history])
    between = (round_only.epsilon(DELTA) + both.epsilon(DELTA)) / 2
    # The run's target-epsilon.
    state = SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
    with pytest.raises(BudgetExceededError, match="refuses round 1 with the release of its sensor statistics.*target-epsilon"):
        train_round(cfg=cfg.replace(target_epsilon=between), site="0", data=site, global_weights=weights, server_round=1, state=state)
    assert state.accountant.history == () and state.site_stats is None
    # The site's own lifetime budget.
    policy, ledger = _policy(tmp_path, between)
    state = SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
    try:
        with pytest.raises(BudgetExceededError, match="with the release of its sensor statistics.*epsilon-budget"):
            train_round(cfg=cfg, site="0", data=site, global_weights=weights, server_round=1, state=state, policy=policy, ledger=ledger, run_id="r")
        assert ledger.entries() == [] and state.site_stats is None
    finally:
        ledger.close()
    # A floor above site-stats-noise is refused too.
    policy, ledger = _policy(tmp_path / "floor", 100.0)
    try:
        with pytest.raises(BudgetExceededError, match="site-stats-noise=0.4 is below this site's floor"):
            train_round(cfg=cfg.replace(site_stats_noise=0.4), site="0", data=site, global_weights=weights, server_round=1, state=state,
                        policy=policy, ledger=ledger, run_id="r")
        assert ledger.entries() == []
    finally:
        ledger.close()


def test_the_spend_is_in_the_ledger_before_training_and_the_audit_shows_it(
    basic: tuple[RunConfig, MultimodalDataset, MultimodalDataset, dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedmm.privacy.audit import audit_ledger

    cfg, site, _, weights = basic
    policy, ledger = _policy(tmp_path, 8.0)
    seen: list[tuple[list[str], np.ndarray]] = []
    real_train = site_round.train

    def checked_train(model: torch.nn.Module, arrays: MultimodalDataset, **kwargs: object) -> float:
        # Called only after the statistics' spend is durable: a fresh read-only view of the file has it.
        with PrivacyLedger.read(policy.ledger_path) as view:
            seen.append(([e.mechanism for e in view.entries()], arrays.features["accelerometer"].copy()))
        return real_train(model, arrays, **kwargs)

    monkeypatch.setattr(site_round, "train", checked_train)
    state = SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
    try:
        for server_round in (1, 2):
            update = train_round(cfg=cfg, site="0", data=site, global_weights=weights, server_round=server_round, state=state,
                                 policy=policy, ledger=ledger, run_id="r")
        entries = ledger.entries()
        assert ledger.verify().ok
    finally:
        ledger.close()
    assert seen[0][0] == [SITE_STATS_MECHANISM] and seen[1][0] == [SITE_STATS_MECHANISM, MECHANISM]
    raw = site.labelled().features["accelerometer"]
    assert not np.allclose(seen[0][1], raw) and np.array_equal(seen[0][1], seen[1][1])  # standardised, the same statistics both rounds
    assert [(e.mechanism, e.noise_multiplier, e.sample_rate, e.steps) for e in entries][:1] == [(SITE_STATS_MECHANISM, 5.0, 1.0, 1)]
    assert [e.mechanism for e in entries] == [SITE_STATS_MECHANISM, MECHANISM, MECHANISM]
    assert update.privacy is not None and update.privacy.epsilon == pytest.approx(entries[-1].epsilon)
    assert update.ledger_entry is not None and update.ledger_entry.seq == 3
    assert update.privacy.epsilon == pytest.approx(_rdp_epsilon(tuple(e.event for e in entries)), rel=1e-9)
    audit = audit_ledger(policy.ledger_path)
    assert audit.ok and len(audit.entries) == 3 and audit.entries[0]["mechanism"] == SITE_STATS_MECHANISM
    assert audit.epsilon == pytest.approx(entries[-1].epsilon, rel=1e-6)


def test_a_dp_run_with_site_statistics_trains_end_to_end() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from inprocess import federate
    finally:
        sys.path.pop(0)
    out = federate({**BASE, "seed": 0})
    assert 0.0 <= out["accuracy"] <= 1.0 and math.isfinite(out["macro_f1"])
    assert 0.0 < out["epsilon"] <= 8.0
