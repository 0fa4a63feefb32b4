"""One privacy accountant per data site, whose history outlives rounds and processes.

The accounting itself is Opacus' (RDP or PRV); fedmm only keeps the history of
``(noise_multiplier, sample_rate, steps)`` events, restores it before every
round, and answers "what would epsilon be after this round?" before training.

>>> acc = SiteAccountant(AccountantKind.RDP)
>>> acc.epsilon(1e-5)
0.0
>>> acc.record(noise_multiplier=1.0, sample_rate=0.156, steps=70)
>>> round(acc.epsilon(1e-5), 1)
10.4
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Iterable

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from fedmm.config import MAX_TARGET_EPSILON, AccountantKind
from fedmm.errors import PrivacyError
from fedmm.privacy.events import PrivacyEvent, PrivacyReport

__all__ = ["PrivacyEvent", "PrivacyReport", "SiteAccountant", "calibrate_noise_multiplier"]

# Opacus warns when RDP's best order is at the end of its range of orders: the bound it returns is then looser than
# it could be, never wrong (fedmm states it with its accountant). Printed in a run's output, it read as a broken guarantee.
warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha", category=UserWarning)


class SiteAccountant:
    """A site's accountant: Opacus' accounting over a history that persists."""

    def __init__(self, kind: AccountantKind, history: Iterable[PrivacyEvent] = ()) -> None:
        self.kind = AccountantKind(kind)
        self._opacus = create_accountant(mechanism=self.kind.value)
        for event in history:
            self.record(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=event.steps)

    @property
    def opacus(self) -> IAccountant:
        """The Opacus accountant object; DP-SGD steps taken through it extend this history."""
        return self._opacus

    @property
    def history(self) -> tuple[PrivacyEvent, ...]:
        """Every event so far, oldest first."""
        return tuple(PrivacyEvent(float(s), float(q), int(n)) for s, q, n in self._opacus.history)

    @property
    def steps(self) -> int:
        """Total DP-SGD steps accounted for."""
        return sum(event.steps for event in self.history)

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Account for ``steps`` more steps (validated) without training."""
        event = PrivacyEvent(noise_multiplier, sample_rate, steps)
        history = self._opacus.history
        if history and history[-1][:2] == (event.noise_multiplier, event.sample_rate):
            history[-1] = (event.noise_multiplier, event.sample_rate, history[-1][2] + event.steps)
        else:
            history.append((event.noise_multiplier, event.sample_rate, event.steps))

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` (0.0 before any step)."""
        if not 0 < delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
        if not self._opacus.history:
            return 0.0
        if self.kind is AccountantKind.RDP:
            # Exactly Opacus' RDPAccountant.get_epsilon, with the per-step RDP of each
            # (noise, rate) pair memoised: RDP composes linearly in the number of steps.
            total = sum(steps * _rdp_per_step(float(sigma), float(q)) for sigma, q, steps in self._opacus.history)
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
            return float(eps)
        with np.errstate(divide="ignore"):  # PRV at sample rate 1 (a site's statistics) takes log(1 - q) = -inf, harmlessly
            return float(self._opacus.get_epsilon(delta=delta))

    def projected_epsilon(self, delta: float, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon this site would have after ``steps`` more steps; changes nothing."""
        trial = SiteAccountant(self.kind, self.history)
        trial.record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return trial.epsilon(delta)

    def report(self, delta: float, *, epsilon: float | None = None) -> PrivacyReport:
        """Summarise the guarantee; noise and sample rate are those of the latest event.

        ``epsilon`` may pass a value already computed for exactly this history.
        """
        last = self.history[-1] if self.history else PrivacyEvent(float("inf"), 1.0, 1)
        return PrivacyReport(
            epsilon=self.epsilon(delta) if epsilon is None else epsilon, delta=delta, accountant=self.kind.value,
            noise_multiplier=last.noise_multiplier, sample_rate=last.sample_rate, steps=self.steps,
        )

    def to_json(self) -> str:
        """Serialise kind and history (restore with :meth:`from_json`)."""
        return json.dumps({"accountant": self.kind.value, "history": [list(map(float, e[:2])) + [e[2]] for e in self._opacus.history]})

    @classmethod
    def from_json(cls, text: str) -> SiteAccountant:
        """Restore an accountant saved by :meth:`to_json`."""
        data = json.loads(text)
        return cls(AccountantKind(data["accountant"]), [PrivacyEvent(float(s), float(q), int(n)) for s, q, n in data["history"]])


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP of one Poisson-subsampled Gaussian step at its default orders."""
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.flags.writeable = False
    return rdp


@functools.lru_cache(maxsize=64)  # a pure function; sites of equal size share the answer
def calibrate_noise_multiplier(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: AccountantKind,
    prior: tuple[PrivacyEvent, ...] = (),
) -> float:
    """Smallest noise multiplier (to a 0.01 epsilon tolerance) whose epsilon after ``steps`` is <= target.

    ``prior`` are spends made before the steps (a site's noisy statistics): the epsilon of
    ``prior`` and the steps together is what must stay <= target.

    RDP uses Opacus' ``get_noise_multiplier`` directly (with ``prior``, a bisection over the
    same memoised RDP). PRV is slow to evaluate, so its search starts from the RDP answer
    (RDP bounds PRV from above, so that noise already meets the target) and bisects
    downwards with the PRV accountant.

    Raises
    ------
    PrivacyError
        When no noise multiplier Opacus can search reaches the target.
    """
    if not 0 < target_epsilon <= MAX_TARGET_EPSILON:  # Opacus' search would never end for a huge one
        raise PrivacyError(f"cannot calibrate noise for target-epsilon={target_epsilon}: it must be in (0, {MAX_TARGET_EPSILON:g}]. "
                           "Fix: e.g. target-epsilon=8.0")
    kind = AccountantKind(accountant)
    prior = tuple(prior)

    def epsilon(sigma: float, with_kind: AccountantKind = kind) -> float:
        trial = SiteAccountant(with_kind, prior)
        trial.record(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return trial.epsilon(target_delta)

    try:
        rdp_sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
                steps=steps, accountant=AccountantKind.RDP.value,
            )
        )
        if prior:
            rdp_sigma = _search_up(lambda s: epsilon(s, AccountantKind.RDP), rdp_sigma, target_epsilon)
    except ValueError as err:
        spent = f", after {SiteAccountant(kind, prior).epsilon(target_delta):.3f} spent on {len(prior)} earlier release(s)" if prior else ""
        raise PrivacyError(
            f"cannot reach target-epsilon={target_epsilon} at delta={target_delta} with sample rate "
            f"{sample_rate:.4g} over {steps} steps{spent} ({err}). Fix: raise target-epsilon, or lower rounds or local-epochs"
            f"{', or raise site-stats-noise' if prior else ''}"
        ) from err
    if kind is AccountantKind.RDP:
        return rdp_sigma

    high, eps_high = rdp_sigma, epsilon(rdp_sigma)
    if eps_high > target_epsilon and prior:  # not expected; search upwards with PRV itself
        high = _search_up(epsilon, rdp_sigma, target_epsilon)
        eps_high = epsilon(high)
    elif eps_high > target_epsilon:  # not expected; fall back to Opacus' own search
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate, steps=steps, accountant=kind.value
        ))
    low = 0.85 * high  # PRV's answer is typically 5-10 % below RDP's
    eps_low = epsilon(low)
    for _ in range(8):  # widen downwards until the bracket holds the answer
        if eps_low > target_epsilon:
            break
        high, eps_high, low = low, eps_low, low * 0.85
        eps_low = epsilon(low)
    tolerance = max(0.01, 0.002 * target_epsilon)
    for _ in range(30):  # bounded: a safeguarded secant step shrinks the bracket each time
        if target_epsilon - eps_high <= tolerance or high - low < 1e-4:
            break
        width = high - low
        guess = high - width * (target_epsilon - eps_high) / (eps_low - eps_high)
        middle = min(max(guess, low + 0.1 * width), high - 0.1 * width)
        eps_middle = epsilon(middle)
        if eps_middle <= target_epsilon:
            high, eps_high = middle, eps_middle
        else:
            low, eps_low = middle, eps_middle
    return high


def _search_up(epsilon: Callable[[float], float], start: float, target: float) -> float:
    """The smallest sigma >= ``start`` (to 0.01 in epsilon, or 1e-4 in sigma) with ``epsilon(sigma) <= target``.

    Raises ValueError when even a noise multiplier of 1e4 is over the target (the prior alone spends it).
    """
    low, high = start, start
    while epsilon(high) > target:
        low, high = high, high * 1.5
        if high > 1e4:
            raise ValueError("no noise multiplier up to 1e4 meets the target: the earlier releases alone spend it")
    if high == start:
        return start
    eps_high = epsilon(high)
    for _ in range(60):
        if target - eps_high <= 0.01 or high - low < 1e-4:
            break
        middle = (low + high) / 2
        eps_middle = epsilon(middle)
        if eps_middle <= target:
            high, eps_high = middle, eps_middle
        else:
            low = middle
    return high
