"""What leaves a site under secure aggregation or client-level DP, made at the site.

Under either, a site sends its *update* (local weights minus the global weights it was
sent), not its weights: updates are small and centred on zero, so they fit SecAgg+'s
quantisation range far better, and client-level DP clips updates, not weights.

In order, before anything is masked:

1. the update is computed and checked (finite, the global model's shapes);
2. client-level DP: it is clipped to ``client-clip-norm`` (L2, whole model), and with
   ``client-noise=distributed`` the site adds its Gaussian share of the noise, after
   checking that the round's quantisation range leaves the share whole (at least
   ``client-clip-norm + 6 x`` its std; :class:`fedmm.privacy.client_dp.ShareCheck`);
3. secure aggregation: Flower's SecAgg+ multiplies it by ``weight / max_weight`` and
   clips every value to ``+-clip_range`` before quantising, silently. The site clips to
   exactly that range itself first, on purpose, and counts the values it clipped, so
   the count reaches the server's log and ``metrics.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedmm.config import RunConfig
from fedmm.errors import FederationError, PrivacyError
from fedmm.privacy.client_dp import SHARE_TRUNCATION_Z, ClientDPPlan, clip_update, gaussian_noise, noise_share_std, share_clip_bound
from fedmm.secure.params import SecAggParams

__all__ = ["OutgoingUpdate", "check_noise_share", "prepare_update", "weight_ratio"]


@dataclass(frozen=True)
class OutgoingUpdate:
    """An update ready to leave the site, with what was done to it."""

    arrays: dict[str, np.ndarray]
    weight: float  # FedAvg's weight: num-examples, or 1 under client-level DP
    norm: float  # L2 norm before client-level clipping (stays at the site)
    clipped_values: int  # values clipped to the quantisation range
    noise_std: float  # the distributed-noise share added here (0: none)


def weight_ratio(weight: float, params: SecAggParams) -> float:
    """The factor SecAgg+ multiplies an update by before quantising (as Flower rounds it)."""
    return round(weight / params.max_weight * params.target_range) / params.target_range


def _check_share_range(plan: ClientDPPlan, secagg: SecAggParams, site: str) -> None:
    """Refuse to send a noise share the round's quantisation range would truncate (the plan's check, at the site).

    The server's SecAgg+ setup decides the range and threshold a site sees; a site whose
    share would be clipped there adds less noise than the federation accounts.
    """
    ratio = weight_ratio(1.0, secagg)  # client-level DP weighs every update 1
    effective = secagg.clip_range / ratio if ratio > 0 else math.inf
    needed = share_clip_bound(plan, secagg.threshold)
    if effective < needed:
        raise PrivacyError(
            f"site {site}: this round's SecAgg+ clip range {effective:.4g} would truncate the site's noise share (share std "
            f"{noise_share_std(plan, secagg.threshold):.3g} for threshold {secagg.threshold}; it needs at least client-clip-norm + "
            f"{SHARE_TRUNCATION_Z:g} x share std = {needed:.4g}); the update is not sent. Fix: run with the server's own config "
            "(fedmm plan checks secagg-clip-range), or raise secagg-clip-range"
        )


def check_noise_share(cfg: RunConfig, secagg: SecAggParams | None, site: str = "site") -> None:
    """Before training: refuse a round whose SecAgg+ setup cannot carry the site's distributed noise share (no secure
    aggregation, or a clip range that would truncate it), so that the site spends nothing on an update it would not send.

    Raises
    ------
    FederationError
        With distributed noise and no secure aggregation this round.
    fedmm.errors.PrivacyError
        When the round's clip range would truncate the noise share.
    """
    plan = ClientDPPlan.from_config(cfg)
    if plan is None or not plan.distributed:
        return
    if secagg is None:
        raise FederationError(f"site {site}: client-noise=distributed needs secure aggregation, and this round has none")
    _check_share_range(plan, secagg, site)


def prepare_update(
    local: Mapping[str, torch.Tensor], global_weights: Mapping[str, np.ndarray], cfg: RunConfig, *,
    weight: float, secagg: SecAggParams | None = None, site: str = "site",
) -> OutgoingUpdate:
    """Turn a site's trained weights into the update it sends (see the module docstring).

    Raises
    ------
    FederationError
        When the trained weights do not match the global model's names or shapes, or are not finite.
    fedmm.errors.PrivacyError
        With distributed noise, when the round's clip range would truncate the site's noise share.
    """
    if set(local) != set(global_weights):
        raise FederationError(
            f"site {site}: trained model has tensors {sorted(set(local) ^ set(global_weights))} that the global model "
            "does not (or the other way round). Fix: run the same fedmm version and model at every site"
        )
    update: dict[str, np.ndarray] = {}
    for name, tensor in local.items():
        mine = tensor.detach().cpu().numpy()
        theirs = np.asarray(global_weights[name])
        if mine.shape != theirs.shape:
            raise FederationError(f"site {site}: tensor '{name}' has shape {mine.shape}, the global model {theirs.shape}")
        if not mine.dtype.kind == "f":
            continue  # integer buffers (e.g. counters) are not averaged as updates
        delta = mine.astype(np.float64) - theirs.astype(np.float64)
        if not np.all(np.isfinite(delta)):
            raise FederationError(
                f"site {site}: its trained tensor '{name}' holds NaN or infinite values; the update is not sent. "
                "Fix: lower learning-rate or max-grad-norm"
            )
        update[name] = delta
    plan = ClientDPPlan.from_config(cfg)
    norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in update.values()))
    noise_std = 0.0
    if plan is not None:
        update, norm = clip_update(update, plan.clip_norm)
        weight = 1.0  # DP-FedAvg weights every site alike: a site's size is not protected otherwise
        if plan.distributed:
            check_noise_share(cfg, secagg, site)  # run before training too; here again for an update prepared otherwise
            assert secagg is not None
            noise_std = noise_share_std(plan, secagg.threshold)
            noise = gaussian_noise({k: v.shape for k, v in update.items()}, noise_std)
            update = {k: v + noise[k] for k, v in update.items()}
    clipped = 0
    if secagg is not None:
        ratio = weight_ratio(weight, secagg)
        if ratio > 0:
            bound = secagg.clip_range / ratio
            for name, value in update.items():
                over = np.abs(value) > bound
                clipped += int(over.sum())
                update[name] = np.clip(value, -bound, bound)
    return OutgoingUpdate(
        arrays={k: v.astype(np.float32) for k, v in update.items()}, weight=weight, norm=norm, clipped_values=clipped, noise_std=noise_std,
    )
