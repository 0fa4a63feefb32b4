"""Privacy: Opacus DP-SGD at each site, its accountant, policy and ledger, and the audit.

- ``fedmm.privacy.events`` / ``accounting``: a privacy history's records; each site's persistent accountant (RDP or PRV) and noise calibration;
- ``fedmm.privacy.ghost``: DP-SGD with one-pass ghost clipping (Opacus' engine; its optimizers in ``dp_optimizers``); ``sampling``: its Poisson loader;
- ``fedmm.privacy.policy`` / ``ledger``: a site's own limits and its hash-chained spend ledger;
- ``fedmm.privacy.client_dp``: client-level DP (DP-FedAvg) and its accountant;
- ``fedmm.privacy.audit``: ``fedmm audit`` over ledgers.

Generic over models. May import ``fedmm.config``/``errors``/``protocol``, ``fedmm.data``
and ``fedmm.models`` only.
"""

from __future__ import annotations

from fedmm._lazy import lazy_exports

_EXPORTS = {  # loaded on first use: the ledger commands need neither Opacus nor PyTorch
    "PrivacyEvent": "fedmm.privacy.events",
    "PrivacyReport": "fedmm.privacy.events",
    "SiteAccountant": "fedmm.privacy.accounting",
    "calibrate_noise_multiplier": "fedmm.privacy.accounting",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("fedmm.privacy", _EXPORTS)
