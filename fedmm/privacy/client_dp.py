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

A distributed share goes through SecAgg+'s quantisation, which clips every value to
``+-secagg-clip-range``: a share truncated there carries less noise than accounted.
:class:`ShareCheck` bounds it: a clipped update's value is at most ``S`` (its L2 norm) and
its share's std at most ``sigma * S / sqrt(t_min)``, with ``t_min`` the smallest threshold
of a round that can be released (:func:`fewest_noise_parties`), so with the range at least
``S + 6 * share std`` a value is clipped with probability below ``2 * Phi(-6) ~ 2e-9``.
A smaller range is refused (:class:`fedmm.errors.ConfigError`) before anything starts.

>>> acct = ClientAccountant(noise_multiplier=1.0, sample_rate=1.0)
>>> acct.epsilon(1e-5)
0.0
>>> acct.record_round(); round(acct.epsilon(1e-5), 2)
4.73
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedmm.config import AccountantKind, RunConfig
from fedmm.errors import ConfigError, PrivacyError
from fedmm.privacy.accounting import PrivacyEvent, SiteAccountant

__all__ = [
    "ClientDPPlan", "ClientAccountant", "ShareCheck", "SHARE_TRUNCATION_Z", "clip_update", "update_norm", "gaussian_noise",
    "noise_share_std", "share_clip_bound", "share_truncation_probability", "secagg_threshold", "fewest_noise_parties",
]

SHARE_TRUNCATION_Z = 6.0  # the least secagg-clip-range is client-clip-norm + this many share stds


@dataclass(frozen=True)
class ShareCheck:
    """Distributed noise against SecAgg+'s clip range: is the largest share safe from truncation?"""

    parties: int  # the fewest parties a share is calibrated for, in a round that can be released
    std: float  # the largest share std: sigma * S / sqrt(parties)
    bound: float  # the least clip range: S + SHARE_TRUNCATION_Z * std
    clip_range: float  # secagg-clip-range

    @property
    def ok(self) -> bool:
        """Whether the clip range leaves every share (all but ``share_truncation_probability()`` of its values) whole."""
        return self.clip_range >= self.bound


@dataclass(frozen=True)
class ClientDPPlan:
    """The client-level DP settings of a run (from :class:`RunConfig`)."""

    clip_norm: float
    noise_multiplier: float
    distributed: bool
    sample_rate: float
    delta: float
    target_epsilon: float | None
    share: ShareCheck | None = None  # distributed noise: its largest share against secagg-clip-range

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ClientDPPlan | None:
        """The plan, or None when ``client-dp`` is off.

        Raises
        ------
        fedmm.errors.ConfigError
            With distributed noise, when ``secagg-clip-range`` would truncate a site's noise share.
        """
        if not cfg.client_dp:
            return None
        plan = cls(
            clip_norm=cfg.client_clip_norm, noise_multiplier=cfg.client_noise_multiplier,
            distributed=cfg.client_noise == "distributed", sample_rate=cfg.client_fraction, delta=cfg.client_delta,
            target_epsilon=cfg.client_target_epsilon or None,
        )
        if not plan.distributed or cfg.sites is None:  # sites=auto: checked once the data has decided it (RunPlan.with_sites)
            return plan
        parties = fewest_noise_parties(cfg)
        share = ShareCheck(parties=parties, std=noise_share_std(plan, parties), bound=share_clip_bound(plan, parties), clip_range=cfg.secagg_clip_range)
        if not share.ok:
            raise ConfigError(
                "secagg-clip-range", f"would truncate the distributed noise: a site's share has std up to {share.std:.4g} "
                f"(client-noise-multiplier={plan.noise_multiplier:g} x client-clip-norm={plan.clip_norm:g} / sqrt({parties}), "
                f"the smallest SecAgg+ threshold of a round that can be unmasked), so every value needs up to client-clip-norm + "
                f"{SHARE_TRUNCATION_Z:g} x {share.std:.4g} = {share.bound:.4g}; values beyond the range are clipped and the sum "
                "would carry less noise than the client-level epsilon accounts", value=cfg.secagg_clip_range,
                fix=f"set secagg-clip-range >= {math.ceil(share.bound * 100) / 100:g}, or lower client-noise-multiplier or "
                "client-clip-norm, or raise secagg-threshold or min-sites",
            )
        return dataclasses.replace(plan, share=share)

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


def share_clip_bound(plan: ClientDPPlan, parties: int) -> float:
    """The least clip range that leaves a share calibrated for ``parties`` whole: ``S + z * share std``.

    A value of a clipped update is at most ``S`` (its whole L2 norm), so a value plus its
    share is clipped only when the share exceeds ``z`` stds: probability below
    :func:`share_truncation_probability`.
    """
    return plan.clip_norm + SHARE_TRUNCATION_Z * noise_share_std(plan, parties)


def share_truncation_probability(z: float = SHARE_TRUNCATION_Z) -> float:
    """The most a value of a share is clipped at the bound: ``P(|N(0, 1)| > z) = 2 Phi(-z)`` (1.97e-9 at z=6)."""
    return math.erfc(z / math.sqrt(2.0))


def secagg_threshold(shares: float, threshold: float, sampled: int) -> int:
    """SecAgg+'s reconstruction threshold for a round of ``sampled`` sites, as Flower 1.42's workflow sets it.

    ``shares`` and ``threshold`` are the run-config values (a fraction when <= 1, else a count).

    >>> secagg_threshold(1.0, 0.67, 10), secagg_threshold(1.0, 0.67, 2), secagg_threshold(5.0, 3.0, 10)
    (7, 2, 3)
    """
    if shares <= 1:
        count = round(shares * sampled)
        if count < sampled and count % 2 == 0:
            count += 1
        if count <= 2:
            count = sampled
    else:
        count = int(shares)
    return max(round(threshold * count), 2) if threshold <= 1 else int(threshold)


def fewest_noise_parties(cfg: RunConfig) -> int:
    """The smallest reconstruction threshold of any round whose sum can be released.

    Each site calibrates its share for the round's threshold; a round is unmasked only when
    at least ``max(2, min-sites)`` sites trained, so it asked at least that many. The largest
    share any released round can carry is calibrated for the value returned here.
    """
    return _fewest_thresholds(cfg.secagg_shares, cfg.secagg_threshold, max(2, cfg.min_sites), cfg.sites)


@functools.lru_cache(maxsize=64)
def _fewest_thresholds(shares: float, threshold: float, first: int, last: int) -> int:
    return min(secagg_threshold(shares, threshold, n) for n in range(first, max(first, last) + 1))


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

    def restore(self, history: Iterable[PrivacyEvent]) -> None:
        """Account rounds taken before a checkpoint, each at the mechanism it ran with (a resumed run may use another)."""
        for event in history:
            self._accountant.record(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=event.steps)
            self.rounds += event.steps

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
