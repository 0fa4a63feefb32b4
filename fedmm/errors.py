"""One exception hierarchy for fedmm.

Every error says what went wrong, where (the file, key or site), the offending
value, and how to fix it. Catch :class:`FedMMError` to handle all of them.
"""

from __future__ import annotations

__all__ = [
    "FedMMError",
    "ConfigError",
    "DataError",
    "PrivacyError",
    "BudgetExceededError",
    "FederationError",
]


class FedMMError(Exception):
    """Base class of every error fedmm raises on purpose."""


class ConfigError(FedMMError, ValueError):
    """A configuration key is unknown, missing, of the wrong type or out of range."""

    def __init__(self, key: str, problem: str, *, value: object = None, fix: str = "") -> None:
        self.key = key
        self.value = value
        message = f"config key '{key}': {problem}"
        if value is not None:
            message += f" (got {value!r})"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)


class DataError(FedMMError):
    """A data file is missing, unreadable, corrupt or of an unexpected shape."""

    def __init__(self, path: object, problem: str, *, fix: str = "") -> None:
        self.path = str(path)
        message = f"{path}: {problem}"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)


class PrivacyError(FedMMError):
    """A privacy guarantee could not be established or would be broken."""


class BudgetExceededError(PrivacyError):
    """A site refused a round because it would exceed the site's privacy budget."""


class FederationError(FedMMError):
    """The federation cannot continue (no usable replies, failed sites, bad updates)."""


class SitesExhausted(FederationError):
    """Too few sites are left with budget (or willing) to go on: the run stops cleanly."""
