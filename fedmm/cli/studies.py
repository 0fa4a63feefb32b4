"""How many whole studies of a plan a site's lifetime budget still allows (``fedmm plan``'s studies column).

A study is one run of the plan: the release of the site's sensor statistics when it makes
one, then ``rounds x steps/rd`` DP-SGD steps. The studies compose in the site's own
accountant (RDP or PRV, as the run's ``accountant``) on top of what its ledger already
holds, at the site's delta, exactly as the site checks its lifetime budget before each
round (:func:`fedmm.site.round.train_round`): a lost ledger's carried epsilon adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmm.config import RunConfig

__all__ = ["Studies", "spent_before", "studies_allowed", "MAX_STUDIES"]

MAX_STUDIES = 1000  # counted up to here; more prints as ">= 1000"


@dataclass(frozen=True)
class Studies:
    count: int  # whole studies that fit, capped at MAX_STUDIES
    spent: float  # the lifetime epsilon the site has spent already (carried included)

    @property
    def text(self) -> str:
        return f">={MAX_STUDIES}" if self.count >= MAX_STUDIES else str(self.count)


def spent_before(cfg: RunConfig, site: str) -> tuple[list[Any], float]:
    """The site's ledger events and carried epsilon under ``site-state-dir`` (none without one, or for a site that never
    had a ledger; a ledger that existed and is missing raises PrivacyError, as the site itself would refuse)."""
    from fedmm.errors import PrivacyError
    from fedmm.privacy.ledger import PrivacyLedger, missing_ledger

    if not cfg.site_state_dir:
        return [], 0.0
    path = Path(cfg.site_state_dir).expanduser() / site / "ledger.sqlite"
    if not path.is_file():
        lost = missing_ledger(path)
        if lost is not None:  # never planned as a fresh site: the site itself refuses to train without it
            raise PrivacyError(lost[1])
        return [], 0.0
    ledger = PrivacyLedger.read(path)
    try:
        return list(ledger.events()), (ledger.carried.epsilon if ledger.carried else 0.0)
    finally:
        ledger.close()


def studies_allowed(cfg: RunConfig, plan: Any, budget: float, *, history: list[Any] = (), carried: float = 0.0) -> Studies:  # type: ignore[assignment]
    """The largest N such that the site's lifetime epsilon after its ``history`` and N studies of ``plan`` is <= ``budget``."""
    from fedmm.privacy.accounting import SiteAccountant

    delta = cfg.target_delta  # a simulated site states its budget at the run's delta (SitePolicy)
    spent = carried + SiteAccountant(cfg.accountant, history).epsilon(delta) if history else carried

    def epsilon(n: int) -> float:
        acct = SiteAccountant(cfg.accountant, history)
        if plan.stats_noise_multiplier > 0:
            for _ in range(n):
                acct.record(noise_multiplier=plan.stats_noise_multiplier, sample_rate=1.0, steps=1)
                acct.record(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=cfg.rounds * plan.steps_per_round)
        elif n:
            acct.record(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=n * cfg.rounds * plan.steps_per_round)
        return carried + acct.epsilon(delta)

    if plan.noise_multiplier <= 0 or epsilon(1) > budget:
        return Studies(0, spent)
    low, high = 1, 2  # epsilon(low) <= budget; grow high until it is over (or the cap)
    while high < MAX_STUDIES and epsilon(high) <= budget:
        low, high = high, high * 2
    if high >= MAX_STUDIES:
        if epsilon(MAX_STUDIES) <= budget:
            return Studies(MAX_STUDIES, spent)
        high = MAX_STUDIES
    while high - low > 1:  # epsilon grows with n: bisect for the last n within budget
        mid = (low + high) // 2
        low, high = (mid, high) if epsilon(mid) <= budget else (low, mid)
    return Studies(low, spent)
