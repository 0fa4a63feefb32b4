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
    "SiteRefused",
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
    """A data file is missing, unreadable, corrupt or of an unexpected shape.

    ``str(err)`` is ``"{path}: {problem}. Fix: {fix}"``. A raiser whose error may travel to
    the server (a deployed site's data) gives a ``path`` that names no local file (e.g.
    ``"manifest row 3, column 'image'"``) and puts local paths and values read from files
    in ``detail``: ``str(err)`` is then what the site may send, while ``err.detail`` and
    ``err.local_message`` (the message with the detail) are for the site's own log and
    terminal only.
    """

    def __init__(self, path: object, problem: str, *, fix: str = "", detail: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        self.detail = detail
        message = f"{path}: {problem}"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)

    @property
    def local_message(self) -> str:
        """The message with the local detail (paths, values): for the site's own log, never to send."""
        if not self.detail:
            return str(self)
        message = f"{self.path}: {self.problem} [{self.detail}]"
        return message + (f". Fix: {self.fix}" if self.fix else "")


class PrivacyError(FedMMError):
    """A privacy guarantee could not be established or would be broken."""


class SiteRefused(PrivacyError):
    """A site declined a round by its own policy: an answer with its reason, not a failure.

    ``public`` is the reason the server may read. Where the full message holds figures that follow from
    the site's records (a projected epsilon or a calibrated noise, functions of its record count), it
    names the limit alone; the site's own log keeps the full message. Without it the message is public.
    """

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = message if public is None else public


class BudgetExceededError(SiteRefused):
    """A site refused a round because it would exceed the site's privacy budget."""


class FederationError(FedMMError):
    """The federation cannot continue (no usable replies, failed sites, bad updates)."""


class SitesExhausted(FederationError):
    """Too few sites are left with budget (or willing) to go on: the run stops cleanly."""
