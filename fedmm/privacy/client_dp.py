"""Client-level differential privacy (DP-FedAvg): protects whole sites, not just records.

Each round every taking-part site clips its update (the change it made to the global
model) to L2 norm ``S = client-clip-norm`` before it leaves the site, so adding or
removing one site changes the sum of updates by at most ``S``. Gaussian noise of
standard deviation ``sigma * S`` (``sigma = client-noise-multiplier``) on that sum makes
each round a Gaussian mechanism; with sites sampled independently with probability
``q = client-fraction`` it is the sampled Gaussian mechanism, accounted with Opacus' RDP
accountant over rounds (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018).

Where the noise comes from (``client-noise``):

- ``central``: the server adds ``N(0, sigma^2 S^2)`` to the sum after it is formed, so it
  is calibrated to exactly the updates aggregated; the server itself sees the sum (or,
  without secure aggregation, each update) before the noise.
- ``distributed``: every site adds a share ``N(0, sigma^2 S^2 / t)`` before masking, where
  ``t`` is the fewest updates the round can aggregate (the SecAgg+ reconstruction
  threshold, which no completed round falls below). With ``m >= t`` shares the sum
  carries variance ``m/t * sigma^2 S^2 >= sigma^2 S^2``: dropouts can only leave more
  noise than accounted, never less, and the server never sees an un-noised aggregate.
  A round with fewer than ``t`` updates cannot be unmasked, and the run stops.

The sum is divided by the expected number of updates (``q`` times the sites asked), not
by how many arrived, as in McMahan et al.'s fixed-denominator estimator.

>>> acct = ClientAccountant(noise_multiplier=1.0, sample_rate=1.0)
>>> acct.epsilon(1e-5)
0.0
>>> acct.record_round(); round(acct.epsilon(1e-5), 2)
4.73
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmm.config import AccountantKind, RunConfig
from fedmm.errors import PrivacyError
from fedmm.privacy.accounting import PrivacyEvent, SiteAccountant

__all__ = ["ClientDPPlan", "ClientAccountant", "clip_update", "update_norm", "gaussian_noise", "noise_share_std"]


@dataclass(frozen=True)
class ClientDPPlan:
    """The client-level DP settings of a run (from :class:`RunConfig`)."""

    clip_norm: float
    noise_multiplier: float
    distributed: bool
    sample_rate: float
    delta: float
    target_epsilon: float | None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ClientDPPlan | None:
        """The plan, or None when ``client-dp`` is off."""
        if not cfg.client_dp:
            return None
        return cls(
            clip_norm=cfg.client_clip_norm, noise_multiplier=cfg.client_noise_multiplier,
            distributed=cfg.client_noise == "distributed", sample_rate=cfg.client_fraction, delta=cfg.client_delta,
            target_epsilon=cfg.client_target_epsilon or None,
        )

    @property
    def sum_noise_std(self) -> float:
        """The noise standard deviation on the sum of updates that the accounting assumes."""
        return self.noise_multiplier * self.clip_norm


def update_norm(update: Mapping[str, np.ndarray] | list[np.ndarray]) -> float:
    """The global L2 norm of an update over all its tensors."""
    arrays = update.values() if isinstance(update, Mapping) else update
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def clip_update(update: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` down to L2 norm ``clip_norm`` if it is longer; return it and its norm before.

    >>> out, norm = clip_update({"w": np.array([3.0, 4.0])}, 1.0)
    >>> norm, out["w"].round(6).tolist()
    (5.0, [0.6, 0.8])
    """
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise PrivacyError(f"the update has a non-finite norm ({norm}); refusing to clip and send it")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v, dtype=np.float64) * scale).astype(np.asarray(v).dtype) for k, v in update.items()}, norm


def noise_share_std(plan: ClientDPPlan, parties: int) -> float:
    """The standard deviation each of at least ``parties`` sites adds so their sum has ``sigma * S``."""
    if parties < 1:
        raise PrivacyError(f"distributed noise needs at least one party to calibrate for, got {parties}")
    return plan.sum_noise_std / math.sqrt(parties)


def gaussian_noise(shapes: Mapping[str, tuple[int, ...]], std: float) -> dict[str, np.ndarray]:
    """Gaussian noise for every tensor, drawn from a generator seeded by the OS (not repeatable)."""
    rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
    return {k: rng.normal(0.0, std, size=shape) for k, shape in shapes.items()}


class ClientAccountant:
    """The federation's client-level privacy loss: one sampled Gaussian mechanism a round (RDP).

    Every round that releases a noised aggregate is recorded, whatever happened to the
    sites that were asked; rounds are never forgotten or refunded.
    """

    def __init__(self, *, noise_multiplier: float, sample_rate: float, rounds: int = 0) -> None:
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.rounds = 0
        self._accountant = SiteAccountant(AccountantKind.RDP)
        for _ in range(rounds):
            self.record_round()

    def record_round(self) -> None:
        """Account one more round."""
        self._accountant.record(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1)
        self.rounds += 1

    def epsilon(self, delta: float) -> float:
        """Client-level epsilon after the rounds so far (RDP)."""
        return self._accountant.epsilon(delta)

    def projected_epsilon(self, delta: float) -> float:
        """Client-level epsilon after one more round."""
        return self._accountant.projected_epsilon(delta, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1)

    @property
    def history(self) -> tuple[PrivacyEvent, ...]:
        """The accounted events, oldest first."""
        return self._accountant.history
