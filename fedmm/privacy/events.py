"""What a site's privacy history is made of: DP-SGD events and the guarantee they add up to.

Plain records, kept apart from :mod:`fedmm.privacy.accounting` so that the ledger and the
commands that only read or write it (``fedmm ledger init``, ``fedmm status``) load without
Opacus and PyTorch (about 3 s of start-up per command).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmm.errors import PrivacyError

__all__ = ["PrivacyEvent", "PrivacyReport"]


@dataclass(frozen=True)
class PrivacyEvent:
    """``steps`` DP-SGD steps with one noise multiplier and Poisson sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyError(f"noise_multiplier must be > 0 for a DP guarantee, got {self.noise_multiplier!r}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if self.steps < 1:
            raise PrivacyError(f"steps must be >= 1, got {self.steps!r}")


@dataclass(frozen=True)
class PrivacyReport:
    """A site's cumulative guarantee: always epsilon with its delta, accountant and steps."""

    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
