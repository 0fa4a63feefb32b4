"""Site accountants: epsilon against Google's dp-accounting, persistence, monotonicity, budgets."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant
from scipy import integrate, stats

from fedmm.config import AccountantKind, RunConfig
from fedmm.data.avmnist import builtin_root, load_site
from fedmm.data.schema import MultimodalDataset
from fedmm.errors import BudgetExceededError, ConfigError, PrivacyError
from fedmm.models import ModelRecipe
from fedmm.privacy.accounting import PrivacyEvent, SiteAccountant, calibrate_noise_multiplier
from fedmm.site import SiteState, plan_site, train_round

DELTA = 1e-5
ORDERS = np.array(RDPAccountant.DEFAULT_ALPHAS)  # the ledger's orders; dp-accounting is given the same ones

# Histories whose epsilons at DELTA span about 0.1 to 50 (dp-accounting's PLD value in the comments),
# single events and compositions of two and three different events.
GRID: list[tuple[PrivacyEvent, ...]] = [
    (PrivacyEvent(3.0, 0.002, 2000),),  # 0.095; RDP's best order is the largest (63), on both sides
    (PrivacyEvent(4.0, 0.01, 10_000),),  # 0.95; Abadi et al. 2016's example, see the published-value test
    (PrivacyEvent(3.0, 0.01, 300), PrivacyEvent(1.5, 0.05, 100)),  # 1.7
    (PrivacyEvent(2.0, 0.02, 500), PrivacyEvent(0.9, 0.1, 30), PrivacyEvent(4.0, 0.05, 200)),  # 5.3
    (PrivacyEvent(1.0, 0.125, 80),),  # 7.9
    (PrivacyEvent(0.8, 0.2, 50),),  # 15
    (PrivacyEvent(0.7, 0.5, 40),),  # 40; RDP's best order (1.6) is one dp-accounting cannot evaluate
    (PrivacyEvent(1.2, 1.0, 60),),  # 48; full batches
]


def _grid_id(history: tuple[PrivacyEvent, ...]) -> str:
    return "+".join(f"{e.noise_multiplier:g}-{e.sample_rate:g}-{e.steps}" for e in history)


def _accountant(kind: AccountantKind, history: tuple[PrivacyEvent, ...]) -> SiteAccountant:
    acc = SiteAccountant(kind)
    for event in history:
        acc.record(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=event.steps)
    assert acc.history == history  # no two neighbouring events share (noise, rate), so none were merged
    return acc


def _independent_event(history: tuple[PrivacyEvent, ...]) -> dpa.DpEvent:
    return dpa.ComposedDpEvent(
        [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(e.sample_rate, dpa.GaussianDpEvent(e.noise_multiplier)), e.steps) for e in history]
    )


@functools.cache  # the slow part (up to ~2 s a history); the PRV and RDP lower-bound tests share it
def _tight_epsilon(history: tuple[PrivacyEvent, ...]) -> float:
    """dp-accounting's PLD epsilon (pessimistic estimate, default 1e-4 grid): the tight value."""
    tight = pld.PLDAccountant()
    tight.compose(_independent_event(history))
    return float(tight.get_epsilon(DELTA))


def _opacus_rdp(history: tuple[PrivacyEvent, ...]) -> np.ndarray:
    """The RDP curve the ledger composes: Opacus' per-order RDP, summed over the events."""
    return sum(compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=ORDERS) for e in history)


def _rdp_by_integration(history: tuple[PrivacyEvent, ...], order: float) -> float:
    """RDP at one order straight from its definition (Mironov et al. 2019): numerical integration, no series."""

    def integrand(z: float, sigma: float, q: float) -> float:  # N(0, sigma^2) density times the likelihood ratio ** order
        log_ratio = (2 * z - 1) / (2 * sigma**2) + math.log(q)
        if q < 1:
            log_ratio = np.logaddexp(math.log1p(-q), log_ratio)
        return math.exp(stats.norm.logpdf(z, 0, sigma) + order * log_ratio)

    total = 0.0
    for e in history:
        sigma = e.noise_multiplier
        moment, _ = integrate.quad(integrand, -60 * sigma, 60 * sigma + order, args=(sigma, e.sample_rate), epsabs=0, epsrel=1e-12, limit=500)
        total += e.steps * math.log(moment) / (order - 1)
    return total


@pytest.mark.parametrize("history", GRID, ids=_grid_id)
def test_rdp_epsilon_equals_dp_accounting_rdp_with_the_same_orders(history: tuple[PrivacyEvent, ...]) -> None:
    acc = _accountant(AccountantKind.RDP, history)
    reference = rdp.RdpAccountant(orders=ORDERS)
    reference.compose(_independent_event(acc.history))
    expected = reference.get_epsilon(DELTA)
    # dp-accounting gives up on a fractional order whose series has not converged after 1000 terms (orders up to
    # 1.5-1.7 here): its RDP there is inf and the order drops out of its minimum. Compare on the orders where
    # it converged. (Its fractional-order values are also up to ~20 % above Opacus' below order 2: it sums the
    # alternating series' absolute values, an upper bound; Opacus' signed sum matches numerical integration.)
    converged = np.isfinite(reference._rdp)  # no public accessor for the per-order RDP
    curve = _opacus_rdp(acc.history)
    ours, best_order = get_privacy_spent(orders=ORDERS, rdp=curve, delta=DELTA)
    ours_on_converged, _ = get_privacy_spent(orders=ORDERS[converged], rdp=curve[converged], delta=DELTA)

    assert acc.epsilon(DELTA) == pytest.approx(ours, rel=1e-12)  # so best_order is the ledger's best order
    # The curve at that order, the one the epsilon comes from, against the definition: whether or not
    # dp-accounting could evaluate it.
    assert curve[ORDERS == best_order][0] == pytest.approx(_rdp_by_integration(acc.history, float(best_order)), rel=1e-6)
    assert ours_on_converged == pytest.approx(expected, rel=0.01)
    if best_order in ORDERS[converged]:
        # Includes the smallest epsilons, whose best order is the largest order on both sides: the same
        # (loose) bound over the same orders, so still comparable; the PLD test below bounds it from below.
        assert acc.epsilon(DELTA) == pytest.approx(expected, rel=0.01)
    else:  # the ledger's minimum is at an order dp-accounting dropped, so it can only be lower
        assert acc.epsilon(DELTA) <= expected


@pytest.mark.parametrize("history", GRID, ids=_grid_id)
def test_rdp_epsilon_is_never_below_the_tight_pld_value(history: tuple[PrivacyEvent, ...]) -> None:
    # A figure below the tight value would claim more privacy than the mechanism gives.
    acc = _accountant(AccountantKind.RDP, history)

    assert _tight_epsilon(acc.history) <= acc.epsilon(DELTA)


@pytest.mark.parametrize("history", GRID, ids=_grid_id)
def test_prv_epsilon_is_never_below_the_tight_pld_value(history: tuple[PrivacyEvent, ...]) -> None:
    acc = _accountant(AccountantKind.PRV, history)
    reference = _tight_epsilon(acc.history)

    assert reference <= acc.epsilon(DELTA) <= max(reference * 1.02, reference + 0.02)


def test_a_published_moments_accountant_figure_reproduces() -> None:
    # Abadi et al. 2016, "Deep Learning with Differential Privacy" (CCS '16, arXiv:1607.00133), Section 3.1:
    # "with L = 0.01N, sigma = 4, delta = 1e-5, and T = 10000, we have epsilon ~ 1.26 using the moments accountant".
    # The paper turns log moments into epsilon with its Theorem 2 tail bound, min over orders of
    # rdp + log(1/delta) / (order - 1); the ledger's conversion (Opacus', Balle et al. 2020) is tighter,
    # so the ledger's own epsilon is lower (1.04) and the figure reproduces from the ledger's RDP curve.
    acc = SiteAccountant(AccountantKind.RDP)
    acc.record(noise_multiplier=4.0, sample_rate=0.01, steps=10_000)
    curve = _opacus_rdp(acc.history)

    assert acc.epsilon(DELTA) == pytest.approx(get_privacy_spent(orders=ORDERS, rdp=curve, delta=DELTA)[0], rel=1e-12)
    assert round(float(np.min(curve + math.log(1 / DELTA) / (ORDERS - 1))), 2) == 1.26
    assert acc.epsilon(DELTA) <= 1.26


@pytest.mark.parametrize("kind", list(AccountantKind))
def test_epsilon_never_decreases_and_survives_a_round_trip(kind: AccountantKind) -> None:
    acc, seen = SiteAccountant(kind), [0.0]
    for round_ in range(5):
        acc.record(noise_multiplier=1.0 + 0.1 * (round_ % 2), sample_rate=0.125, steps=16)
        restored = SiteAccountant.from_json(acc.to_json())
        assert restored.history == acc.history
        seen.append(restored.epsilon(DELTA))

    assert seen == sorted(seen)
    assert acc.steps == 80


def _random_events(seed: int, count: int) -> Iterator[PrivacyEvent]:
    """Rounds as a site might see them: noise and rate change now and then, step counts vary, some nearly free."""
    rng, pair = random.Random(seed), None
    for _ in range(count):
        if pair is None or rng.random() < 0.5:
            pair = (rng.choice([0.9, 2.0, 5.0, 20.0]), rng.choice([0.001, 0.01, 0.05, 0.2]))
        yield PrivacyEvent(*pair, steps=rng.choice([1, 3, 10, 30, 100]))


# PRV takes ~0.3 s an epsilon here (more as distinct events pile up; ~3 s in all), so its sequence is shorter.
@pytest.mark.parametrize(("kind", "count"), [(AccountantKind.RDP, 300), (AccountantKind.PRV, 12)])
def test_epsilon_never_decreases_over_a_long_random_sequence(kind: AccountantKind, count: int) -> None:
    acc, seen = SiteAccountant(kind), [0.0]
    for event in _random_events(seed=0, count=count):
        acc.record(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=event.steps)
        seen.append(acc.epsilon(DELTA))

    assert seen == sorted(seen)
    assert len(acc.history) > 2 and seen[-1] > 5  # several distinct events, up to a large epsilon


@pytest.mark.xfail(
    strict=True,
    reason="known: Opacus' PRV epsilon is numerical (FFT); a nearly free step can lower it by ~1e-8 to 1e-7 (the site ledger states the max of it and the last stated value)",
)
def test_prv_epsilon_does_not_drop_when_a_nearly_free_step_is_added() -> None:
    # The random sequence above happens not to hit this; adding steps that cost almost nothing does.
    acc = SiteAccountant(AccountantKind.PRV)
    acc.record(noise_multiplier=1.5, sample_rate=0.05, steps=100)
    seen = [acc.epsilon(DELTA)]
    for _ in range(4):
        acc.record(noise_multiplier=20.0, sample_rate=0.001, steps=1)
        seen.append(acc.epsilon(DELTA))

    assert seen == sorted(seen)


def test_events_are_range_checked() -> None:
    acc = SiteAccountant(AccountantKind.RDP)
    with pytest.raises(PrivacyError, match="noise_multiplier must be > 0"):
        acc.record(noise_multiplier=0.0, sample_rate=0.1, steps=1)
    with pytest.raises(PrivacyError, match="sample_rate"):
        acc.record(noise_multiplier=1.0, sample_rate=1.5, steps=1)
    with pytest.raises(PrivacyError, match="delta"):
        acc.epsilon(1.0)


@pytest.mark.parametrize("kind", list(AccountantKind))
def test_calibrated_noise_reaches_but_does_not_exceed_the_target(kind: AccountantKind) -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=4.0, target_delta=DELTA, sample_rate=0.125, steps=64, accountant=kind)
    acc = SiteAccountant(kind)
    acc.record(noise_multiplier=sigma, sample_rate=0.125, steps=64)

    assert 3.95 <= acc.epsilon(DELTA) <= 4.0


# -------------------------------------------------------------- a site's rounds
def _model(name: str) -> torch.nn.Module:
    recipe = ModelRecipe.from_config(RunConfig(model=name))
    return recipe.build(recipe.prepare(load_site(builtin_root(), "theo")).schema)


@pytest.fixture(scope="module")
def small_site() -> MultimodalDataset:
    return load_site(builtin_root(), "theo").subset(range(48))


def test_site_epsilon_after_r_rounds_equals_an_independent_computation(small_site: MultimodalDataset) -> None:
    cfg = RunConfig(rounds=3, local_epochs=1, batch_size=16, target_epsilon=6.0, accountant=AccountantKind.RDP)
    saved = SiteState(plan=None, accountant=SiteAccountant(cfg.accountant)).to_json()
    weights = _model(cfg.model).state_dict()
    reported = []
    for server_round in range(1, cfg.rounds + 1):
        state = SiteState.from_json(saved)  # as a fresh client process restores it
        update = train_round(cfg=cfg, site="theo", data=small_site, global_weights=weights, server_round=server_round, state=state)
        saved = state.to_json()
        weights = update.state_dict
        assert update.privacy is not None
        reported.append(update.privacy.epsilon)

    reference = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    plan = plan_site(cfg, len(small_site))
    reference.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(plan.sample_rate, dpa.GaussianDpEvent(plan.noise_multiplier)), cfg.rounds * plan.steps_per_round))
    assert reported == sorted(reported)
    assert reported[-1] == pytest.approx(reference.get_epsilon(cfg.target_delta), rel=0.01)
    assert reported[-1] <= cfg.target_epsilon


def test_a_round_over_budget_is_refused_before_training(small_site: MultimodalDataset) -> None:
    cfg = RunConfig(rounds=1, local_epochs=1, batch_size=16, target_epsilon=1.0, noise_multiplier=0.5, accountant=AccountantKind.RDP)
    state = SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))

    with pytest.raises(BudgetExceededError, match=r"site theo refuses round 1.*over the budget target-epsilon=1.0"):
        train_round(cfg=cfg, site="theo", data=small_site, global_weights=_model(cfg.model).state_dict(), server_round=1, state=state)
    assert state.accountant.history == ()  # nothing was spent


def test_the_plan_counts_the_steps_opacus_really_takes() -> None:
    # ceil(93 / 1) = 93 batches, but Opacus' Poisson loader takes int(1 / (1 / 93)) = 92 steps:
    # the plan must say 92, or every round would be refused for a step-count mismatch.
    data = load_site(builtin_root(), "theo").subset(range(93))
    cfg = RunConfig(rounds=1, batch_size=1, target_epsilon=50.0, accountant=AccountantKind.RDP)
    state = SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))

    update = train_round(cfg=cfg, site="theo", data=data, global_weights=_model(cfg.model).state_dict(), server_round=1, state=state)

    assert state.plan is not None and state.plan.steps_per_round == 92 == state.accountant.steps
    assert update.privacy is not None and update.privacy.steps == 92


@pytest.mark.parametrize(("sigma", "q", "rounds"), [(1.0, 1.0, 20), (1.1, 0.1, 300), (0.9, 0.3, 50)])
def test_client_level_epsilon_after_r_rounds_equals_an_independent_computation(sigma: float, q: float, rounds: int) -> None:
    from fedmm.privacy.client_dp import ClientAccountant

    acct = ClientAccountant(noise_multiplier=sigma, sample_rate=q)
    for _ in range(rounds):
        acct.record_round()
    history = (PrivacyEvent(sigma, q, rounds),)
    reference = rdp.RdpAccountant(orders=ORDERS)
    reference.compose(_independent_event(history))

    assert acct.history == history and acct.rounds == rounds
    assert acct.epsilon(DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=0.01)
    assert acct.epsilon(DELTA) >= _tight_epsilon(history)  # never below the tight (PLD) value
    if q == 1.0:  # no sampling: the Gaussian mechanism's RDP is R * alpha / (2 sigma^2), in closed form
        closed, _ = get_privacy_spent(orders=ORDERS, rdp=rounds * ORDERS / (2 * sigma**2), delta=DELTA)
        assert acct.epsilon(DELTA) == pytest.approx(closed, rel=1e-9)


def test_a_huge_target_epsilon_is_refused_at_once_not_searched_forever() -> None:
    """Review of 3 Dec: target-epsilon=1e20 with noise 'auto' hung a site for good in Opacus' noise search (1e12: 1 s)."""
    with pytest.raises(ConfigError, match=r"target-epsilon': must be at most 10000.*Fix: e.g. target-epsilon=8.0, or dp=false"):
        RunConfig.from_run_config({"target-epsilon": 1e20})
    with pytest.raises(PrivacyError, match=r"must be in \(0, 10000\]"):
        calibrate_noise_multiplier(target_epsilon=1e308, target_delta=1e-5, sample_rate=0.25, steps=8, accountant="rdp")
    assert calibrate_noise_multiplier(target_epsilon=1e4, target_delta=1e-5, sample_rate=0.25, steps=8, accountant="rdp") > 0
