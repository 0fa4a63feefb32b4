"""Shorter fixed waits in Flower 1.42's deployed runtime (round latency, issue 7).

A deployed message passes through three Flower loops whose waits are hard-coded, not
settings, and which together cost seconds per message on a round that trains in a fraction
of one:

1. the SuperNode's main loop (``flwr.supernode.start_client_internal``) sleeps 3 s when the
   SuperLink has nothing for it, and looks for the ClientApp's reply every 0.5 s;
2. the SuperNode hands a message to its ClientApp before it has fetched the message's
   arrays, and whoever fetches objects that are not there yet (the SuperNode from the
   SuperLink, the ClientApp from the SuperNode, the ServerApp's grid from the SuperLink)
   backs off 1 s, 2 s, 4 s ... (``pull_objects``, ``PULL_INITIAL_BACKOFF = 1``).

3. a SuperNode tells the SuperLink it is alive every ~24 s (``HEARTBEAT_DEFAULT_INTERVAL`` 30 s,
   which the SuperLink refuses below 10 s), and the SuperLink declares it offline only after
   two missed intervals: a site that died mid-round stalls the round for up to a minute
   before the ServerApp hears "Node Unavailable" (:func:`short_heartbeats`,
   :func:`accept_short_heartbeats`).

The helpers below change only those waits, in the named Flower module's own namespace: the
protocol, TLS, authentication and every message stay Flower's. Each returns False when
the installed Flower no longer has what it patches (and then leaves it alone), and
``tests/test_deploy.py`` checks that they still apply to the pinned Flower.
"""

from __future__ import annotations

import functools
import time
from types import ModuleType
from typing import Any

__all__ = ["HEARTBEAT_CALL_TIMEOUT", "OBJECT_PULL_BACKOFF", "accept_short_heartbeats", "cap_sleeps", "quick_object_pulls", "short_heartbeats"]

OBJECT_PULL_BACKOFF: dict[str, Any] = {"initial_backoff": 0.02, "backoff_cap": 0.5, "max_tries_per_object": None}  # Flower's max_time (2 h) still bounds it


class _CappedTime:
    """The ``time`` module as one Flower module sees it, with ``sleep`` capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_sleeps(module: ModuleType, cap: float) -> bool:
    """Cap every ``time.sleep`` in ``module`` at ``cap`` seconds (0.01 to 3)."""
    if not 0.01 <= cap <= 3.0:
        raise ValueError(f"a poll interval must be between 0.01 and 3 seconds, got {cap}")
    current = getattr(module, "time", None)
    if isinstance(current, _CappedTime):
        current.cap = cap
        return True
    if current is not time:
        return False
    module.time = _CappedTime(cap)  # type: ignore[attr-defined]
    return True


def quick_object_pulls(module: ModuleType, *, max_time: float | None = None) -> bool:
    """Make ``module``'s ``pull_objects`` retry an object that is not there yet every 20 ms to 0.5 s.

    ``max_time`` (seconds) gives up on a message whose arrays never arrive, e.g. a message the
    ServerApp was killed while sending, which a restarted SuperLink still hands out.
    """
    from flwr.supercore.inflatable import inflatable_utils

    current = getattr(module, "pull_objects", None)
    if isinstance(current, functools.partial) and current.func is inflatable_utils.pull_objects:
        return True
    if current is not inflatable_utils.pull_objects:
        return False
    extra = {} if max_time is None else {"max_time": max_time}
    module.pull_objects = functools.partial(inflatable_utils.pull_objects, **OBJECT_PULL_BACKOFF, **extra)  # type: ignore[attr-defined]
    return True


HEARTBEAT_CALL_TIMEOUT = 1.0  # seconds one heartbeat request may take before it counts as failed (and is retried)
MIN_HEARTBEAT_INTERVAL = 1.0  # the shortest interval fedmm's SuperLink accepts (Flower's: 10 s)


def short_heartbeats(interval: float) -> bool:
    """In a SuperNode process: announce ``interval`` seconds to the SuperLink and heartbeat every ~0.8 x (interval - 1 s).

    The SuperLink declares the node offline after two intervals without a heartbeat, so a
    site that dies is named lost about ``2 x interval`` seconds later. The SuperLink must
    accept the interval (:func:`accept_short_heartbeats`; ``fedmm server`` does).
    """
    if not MIN_HEARTBEAT_INTERVAL <= interval <= 30:
        raise ValueError(f"a heartbeat interval must be between {MIN_HEARTBEAT_INTERVAL:g} and 30 seconds, got {interval}")
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_client, fleet_http_connection

    modules = ((heartbeat, ("HEARTBEAT_DEFAULT_INTERVAL", "HEARTBEAT_CALL_TIMEOUT")), (fleet_http_connection, ("HEARTBEAT_DEFAULT_INTERVAL",)), (fleet_http_client, ("HEARTBEAT_CALL_TIMEOUT",)))
    if not all(hasattr(module, name) for module, names in modules for name in names):
        return False
    values = {"HEARTBEAT_DEFAULT_INTERVAL": float(interval), "HEARTBEAT_CALL_TIMEOUT": min(HEARTBEAT_CALL_TIMEOUT, interval / 2)}
    for module, names in modules:
        for name in names:
            setattr(module, name, values[name])
    return True


def accept_short_heartbeats() -> bool:
    """In the SuperLink process: accept SuperNode heartbeat intervals down to 1 s (Flower: 10 s)."""
    from flwr.superlink.servicer.fleet import fleet_handlers

    if not hasattr(fleet_handlers, "HEARTBEAT_MIN_INTERVAL"):
        return False
    fleet_handlers.HEARTBEAT_MIN_INTERVAL = MIN_HEARTBEAT_INTERVAL  # type: ignore[attr-defined,assignment]
    return True
