"""Site accountants: epsilon against Google's dp-accounting, persistence, monotonicity, budgets."""

from __future__ import annotations

import dp_accounting as dpa
import pytest
import torch
from dp_accounting import pld, rdp
from opacus.accountants.rdp import RDPAccountant

from fedmm.config import AccountantKind, RunConfig
from fedmm.data.avmnist import builtin_root, load_site
from fedmm.data.schema import MultimodalDataset
from fedmm.errors import BudgetExceededError, PrivacyError
from fedmm.models import ModelRecipe
from fedmm.privacy.accounting import PrivacyEvent, SiteAccountant, calibrate_noise_multiplier
from fedmm.site import SiteState, plan_site, train_round

DELTA = 1e-5
GRID = [(1.0, 0.125, 80), (0.8, 0.2, 50), (2.0, 0.01, 1000), (1.1, 0.125, 16), (4.0, 0.05, 200)]


def _independent_event(history: tuple[PrivacyEvent, ...]) -> dpa.DpEvent:
    return dpa.ComposedDpEvent(
        [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(e.sample_rate, dpa.GaussianDpEvent(e.noise_multiplier)), e.steps) for e in history]
    )


@pytest.mark.parametrize(("sigma", "q", "steps"), GRID)
def test_rdp_epsilon_equals_dp_accounting_rdp_with_the_same_orders(sigma: float, q: float, steps: int) -> None:
    acc = SiteAccountant(AccountantKind.RDP)
    acc.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
    reference = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    reference.compose(_independent_event(acc.history))

    assert acc.epsilon(DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=0.01)


@pytest.mark.parametrize(("sigma", "q", "steps"), GRID)
def test_prv_epsilon_is_never_below_the_tight_pld_value(sigma: float, q: float, steps: int) -> None:
    acc = SiteAccountant(AccountantKind.PRV)
    acc.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
    tight = pld.PLDAccountant()
    tight.compose(_independent_event(acc.history))
    reference = tight.get_epsilon(DELTA)

    assert reference <= acc.epsilon(DELTA) <= max(reference * 1.02, reference + 0.02)


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
