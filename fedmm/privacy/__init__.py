"""Privacy: Opacus DP-SGD at each site, its accountant, policy and ledger, and the audit.

- ``fedmm.privacy.accounting``: each site's persistent accountant (RDP or PRV) and noise calibration;
- ``fedmm.privacy.ghost``: DP-SGD with one-pass ghost clipping (Opacus' optimizer); ``sampling``: its Poisson loader;
- ``fedmm.privacy.policy`` / ``ledger``: a site's own limits and its hash-chained spend ledger;
- ``fedmm.privacy.client_dp``: client-level DP (DP-FedAvg) and its accountant;
- ``fedmm.privacy.audit``: ``fedmm audit`` over ledgers.

Generic over models. May import ``fedmm.config``/``errors``/``protocol``, ``fedmm.data``
and ``fedmm.models`` only.
"""

from fedmm.privacy.accounting import PrivacyEvent, PrivacyReport, SiteAccountant, calibrate_noise_multiplier

__all__ = ["PrivacyEvent", "PrivacyReport", "SiteAccountant", "calibrate_noise_multiplier"]
