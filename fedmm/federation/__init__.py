"""The server's side of a federation, testable without a running Flower server.

- ``fedmm.federation.book``: :class:`FederationBook` (per-site privacy reports as a
  maximum, refusals, rejected updates, min-sites, client-level DP);
- ``fedmm.federation.checks``: :func:`check_update` and :func:`check_weight`, the checks an
  update passes before anything is summed, and :func:`aggregate_train_metrics`;
- ``fedmm.federation.strategy``: :class:`FedMMAvg` (plain aggregation);
- ``fedmm.federation.central``: the central evaluation on the server's held-out set
  (accuracy, macro-F1, per-class scores, confusion matrix);
- ``fedmm.federation.robust``: the update-norm bound and the robust aggregation rules
  (trimmed mean, median, Krum: Flower's own);
- ``fedmm.federation.identity``: the server's own account of each site (one node per name,
  ledgers and epsilons that never go back, its own accountant over the reported mechanism);
- ``fedmm.federation.secagg``: the same book on Flower's SecAgg+ (legacy) workflow;
- ``fedmm.federation.artifacts``: a run's folder (config, metrics, checkpoints, model,
  summary, privacy witness).

May import: ``fedmm.config``/``errors``/``protocol``, ``fedmm.data``, ``fedmm.models``,
``fedmm.privacy``, ``fedmm.secure``, ``fedmm.plan`` and ``fedmm.site``; never
``fedmm.runtime`` or the top-level ``server``/``clients``.
"""

from __future__ import annotations

from fedmm._lazy import lazy_exports

_EXPORTS = {
    "SitePrivacy": "fedmm.federation.book",
    "FederationBook": "fedmm.federation.book",
    "check_update": "fedmm.federation.checks",
    "check_weight": "fedmm.federation.checks",
    "aggregate_train_metrics": "fedmm.federation.checks",
    "FedMMAvg": "fedmm.federation.strategy",
    "make_central_evaluation": "fedmm.federation.central",
    "SecureFedMM": "fedmm.federation.secagg",
    "FedMMSecAggPlus": "fedmm.federation.secagg",
    "make_workflow": "fedmm.federation.secagg",
    "RunArtifacts": "fedmm.federation.artifacts",
    "SiteAccount": "fedmm.federation.identity",
    "Aggregation": "fedmm.federation.robust",
    "new_run_id": "fedmm.federation.artifacts",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("fedmm.federation", _EXPORTS)
