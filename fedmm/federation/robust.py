"""Aggregation rules for federations that do not trust every site, and the update-norm bound.

- :class:`Aggregation`: ``fedavg`` (weighted by ``num-examples``, the default) or one of the
  robust rules ``trimmed-mean``, ``median`` and ``krum``, which ignore the weights (a site's
  weight is what it says it is) and bound what ``malicious-sites`` sites can do to the
  global model;
- :func:`aggregate`: one rule over the updates the server accepted. The rules are Flower's
  own: FedAvg is ``flwr.server.strategy.aggregate.aggregate`` (accumulated here in float64,
  one update at a time), the trimmed mean is ``flwr.serverapp.strategy.fedtrimmedavg.trim_mean``
  (scipy's ``trim_mean``), the median ``flwr.server.strategy.aggregate.aggregate_median``
  (coordinate-wise, Yin et al., ICML 2018) and Krum ``flwr.serverapp.strategy.multikrum.select_multikrum``
  with one update kept (Blanchard et al., NeurIPS 2017);
- :func:`least_updates`: how many accepted updates a rule needs to tolerate f malicious ones;
- :func:`update_norm_bound`: what ``max-update-norm = "auto"`` resolves to.

Robust rules run on the plain path only: under secure aggregation the server holds only the
sum of the updates, and client-level DP's noise is calibrated for a sum of clipped updates
(:class:`fedmm.config.RunConfig` refuses both combinations).

The ``auto`` bound on ``||site weights - global weights||_2`` (docs/privacy.md, "Rejected
updates"), with learning rate ``lr``, momentum ``mu``, ``E`` local epochs, batch size ``B``
and ``d`` model values:

- client-level DP: ``client-clip-norm`` (the sites clip to it);
- sample-level DP (DP-SGD, clip ``C``, noise multiplier ``sigma``): a site with ``k`` batches
  an epoch takes ``T = E k`` steps of ``lr / b (sum of clipped gradients + sigma C z)``, ``b`` its
  expected batch (``b = n >= 1`` when ``k = 1``, else ``b >= (B (k - 1) + 1) // k``). With
  momentum every step counts at most ``1 / (1 - mu)`` times, so with probability above
  ``1 - 2e-9`` ``||update|| <= lr / (1 - mu) C (S_k + sigma sqrt(T) (sqrt(d) + 6.44) / b)``,
  ``S_k`` the clipped-gradient mass over ``b``: ``E`` when ``k = 1`` (every record every step),
  ``4 T`` when the Chernoff bound on the Poisson batch sizes holds (``E (B (k - 1) + 1) >= 63``),
  else ``2 k T``. ``6.44 = sqrt(2 ln 1e9)``: ``||z|| <= sqrt(d) + t`` fails with probability
  ``exp(-t^2 / 2)``. The bound is the largest over ``k = 1 .. ceil(max-site-weight / B)``
  (the server does not know a site's size under DP, and must not take its word for it), with
  ``sigma`` = ``noise-multiplier``, or under ``auto`` the one calibrated for ``k = 1`` (a
  sample rate of 1), the largest any site's plan can have;
- without DP a plain SGD step is not bounded; the heuristic takes a batch's mean gradient at
  most :data:`PLAIN_GRADIENT_NORM` (about 60x the 1.6 measured in the synthetic federation) for every
  step the largest site takes: ``lr / (1 - mu) x E ceil(max-site-weight / B) x 100``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate_median
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedmm.config import RunConfig
from fedmm.errors import ConfigError
from fedmm.plan import batch_size

__all__ = ["Aggregation", "aggregate", "least_updates", "update_norm_bound", "cast_like", "PLAIN_GRADIENT_NORM", "NOISE_TAIL"]

PLAIN_GRADIENT_NORM = 100.0  # without DP: a generous bound on the L2 norm of one batch's mean gradient
NOISE_TAIL = math.sqrt(2 * math.log(1e9))  # ||N(0, I_d)|| > sqrt(d) + this with probability <= 1e-9
CHERNOFF_MEAN = 63  # a Binomial sum of mean >= 63 exceeds twice its mean with probability <= exp(-21) < 1e-9


class Aggregation(StrEnum):
    """How the plain path combines the accepted updates (run-config key ``aggregation``)."""

    FEDAVG = "fedavg"
    TRIMMED_MEAN = "trimmed-mean"
    MEDIAN = "median"
    KRUM = "krum"

    @classmethod
    def parse(cls, value: str) -> Aggregation:
        """The rule named ``value``; :class:`ConfigError` with the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError("aggregation", f"must be one of {', '.join(m.value for m in cls)}", value=value, fix="e.g. aggregation='fedavg'") from None


def least_updates(rule: Aggregation, malicious: int) -> int:
    """Accepted updates a round needs for ``rule`` to tolerate ``malicious`` bad ones.

    >>> least_updates(Aggregation.TRIMMED_MEAN, 1), least_updates(Aggregation.KRUM, 1), least_updates(Aggregation.FEDAVG, 3)
    (3, 5, 1)
    """
    if rule is Aggregation.FEDAVG:
        return 1
    if rule is Aggregation.KRUM:
        return 2 * malicious + 3  # Krum's n > 2f + 2
    return 2 * malicious + 1  # an honest majority at every coordinate


def _cut_fraction(malicious: int, n: int) -> float:
    """The ``trim_mean`` fraction that cuts exactly ``malicious`` values from each end of ``n``."""
    return min((malicious + 0.5) / n, 0.5 - 1e-12)


def aggregate(
    rule: Aggregation, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[int], *, malicious: int = 0,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Combine ``updates`` (same names and shapes, checked before) by ``rule``; float64 out.

    Returns the aggregate and the indices of the updates it is made of (every one, or
    Krum's choice). ``weights`` (validated integers >= 1) count for ``fedavg`` only.

    >>> ups = [{"w": np.array([v])} for v in (1.0, 2.0, 3.0, 1e6)]
    >>> float(aggregate(Aggregation.MEDIAN, ups, [1, 1, 1, 1])[0]["w"][0])
    2.5
    >>> float(aggregate(Aggregation.TRIMMED_MEAN, ups, [1, 1, 1, 1], malicious=1)[0]["w"][0])
    2.5
    >>> float(aggregate(Aggregation.FEDAVG, ups[:2], [1, 3])[0]["w"][0])
    1.75
    """
    if not updates:
        raise ValueError("no update to aggregate")
    names = list(updates[0])
    n = len(updates)
    if rule is Aggregation.FEDAVG:
        total = sum(int(w) for w in weights)  # integers: exact, and > 0 once every weight passed its check
        summed = {k: np.zeros(np.shape(updates[0][k]), np.float64) for k in names}
        for update, weight in zip(updates, weights):
            for k in names:
                summed[k] += np.asarray(update[k], np.float64) * int(weight)
        return {k: v / total for k, v in summed.items()}, list(range(n))
    if n < least_updates(rule, malicious):
        raise ValueError(f"{rule.value} needs at least {least_updates(rule, malicious)} updates to tolerate {malicious} malicious, got {n}")
    if rule is Aggregation.TRIMMED_MEAN:
        cut = _cut_fraction(malicious, n)
        return {k: np.asarray(trim_mean(np.stack([np.asarray(u[k], np.float64) for u in updates]), cut)) for k in names}, list(range(n))
    if rule is Aggregation.MEDIAN:
        layers = aggregate_median([([np.asarray(u[k], np.float64) for k in names], 1) for u in updates])
        return {k: np.asarray(v, np.float64) for k, v in zip(names, layers)}, list(range(n))
    # Krum scores distances, which do not change under a common shift: shifting every update by the
    # first keeps Flower's ||x||^2 + ||y||^2 - 2 x.y exact enough in float64 for weights far from 0.
    flat = [np.concatenate([np.asarray(u[k], np.float64).ravel() for k in names]) for u in updates]
    contents = [RecordDict({"arrays": ArrayRecord({"update": Array(f - flat[0])})}) for f in flat]
    (chosen,) = select_multikrum(contents, num_malicious_nodes=malicious, num_nodes_to_select=1)
    index = next(i for i, c in enumerate(contents) if c is chosen)
    return {k: np.asarray(updates[index][k], np.float64) for k in names}, [index]


def cast_like(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``value`` (float64) in the global model's dtype: rounded first for integer tensors."""
    if dtype.kind in "iu":
        value = np.rint(value)
    return np.ascontiguousarray(value.astype(dtype))


def update_norm_bound(cfg: RunConfig, *, learning_rate: float, parameters: int) -> float:
    """``max-update-norm``, or what ``auto`` resolves to for this plan (see the module docstring).

    ``learning_rate`` is the sites' (``RunPlan.learning_rate``); ``parameters`` the number of
    floating-point values in the global model.

    >>> cfg = RunConfig(dp=False, max_site_weight=640, batch_size=64, learning_rate=0.5)
    >>> update_norm_bound(cfg, learning_rate=0.5, parameters=1000)  # 0.5 x 1 epoch x 10 steps x 100
    500.0
    """
    if cfg.max_update_norm is not None:
        return cfg.max_update_norm
    if cfg.client_dp:
        return cfg.client_clip_norm
    step = learning_rate / (1.0 - (cfg.momentum or 0.0))  # the server resolves momentum=auto first (RunPlan.resolved)
    epochs, batch = cfg.local_epochs, batch_size(cfg)
    k_max = max(1, math.ceil(cfg.max_site_weight / batch))
    if not cfg.dp:
        return step * epochs * k_max * PLAIN_GRADIENT_NORM
    sigma = cfg.noise_multiplier
    if sigma is None:
        from fedmm.privacy.accounting import calibrate_noise_multiplier

        sigma = calibrate_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, sample_rate=1.0,
            steps=cfg.rounds * epochs, accountant=cfg.accountant,
        )
    k = np.arange(1, k_max + 1, dtype=np.float64)
    steps = epochs * k
    least_batch = np.where(k == 1, 1.0, np.maximum(1.0, np.floor((batch * (k - 1) + 1) / k)))
    mass = np.where(k == 1, float(epochs), np.where(epochs * (batch * (k - 1) + 1) >= CHERNOFF_MEAN, 4 * steps, 2 * k * steps))
    noise = sigma * np.sqrt(steps) * (math.sqrt(parameters) + NOISE_TAIL) / least_batch
    return float(step * cfg.max_grad_norm * np.max(mass + noise))
