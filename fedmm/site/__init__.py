"""A data site's side of a federation, testable without Flower.

One round is ``check budget -> train -> record the spend durably -> return the update``:

- ``fedmm.site.round``: :func:`train_round` (DP-SGD under the site's own policy and
  ledger), :func:`plan_site` (the noise a site's budget allows), :class:`SiteState`;
- ``fedmm.site.runner``: :func:`run_round`, a round as plain data in and out, which the
  ClientApp and the deployed site's long-lived executor call;
- ``fedmm.site.io``: that plain data (:class:`RoundRequest`, :class:`RoundResponse`),
  light enough for the ClientApp to import without PyTorch;
- ``fedmm.site.training``: the local training loops, plain and DP-SGD;
- ``fedmm.site.data``: which site a node is, its training data, its class weights.

May import: ``fedmm.config``/``errors``/``protocol``, ``fedmm.data``, ``fedmm.models``,
``fedmm.privacy``, ``fedmm.secure`` and ``fedmm.plan``; never ``fedmm.federation``,
``fedmm.runtime`` or the top-level ``server``/``clients``. Submodules load on first use,
so importing ``fedmm.site.io`` stays light.
"""

from __future__ import annotations

from fedmm._lazy import lazy_exports

_EXPORTS = {
    "SitePlan": "fedmm.site.round",
    "SiteState": "fedmm.site.round",
    "SiteUpdate": "fedmm.site.round",
    "plan_site": "fedmm.site.round",
    "train_round": "fedmm.site.round",
    "data_digest": "fedmm.site.round",
    "site_data": "fedmm.site.data",
    "class_weights": "fedmm.site.data",
    "run_round": "fedmm.site.runner",
    "RoundRequest": "fedmm.site.io",
    "RoundResponse": "fedmm.site.io",
    "DPSettings": "fedmm.site.training",
    "train": "fedmm.site.training",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("fedmm.site", _EXPORTS)
