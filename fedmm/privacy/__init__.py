"""Privacy: Opacus DP-SGD at each site, and each site's persistent accountant."""

from fedmm.privacy.accounting import PrivacyEvent, PrivacyReport, SiteAccountant, calibrate_noise_multiplier

__all__ = ["PrivacyEvent", "PrivacyReport", "SiteAccountant", "calibrate_noise_multiplier"]
