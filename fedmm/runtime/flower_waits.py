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

__all__ = ["OBJECT_PULL_BACKOFF", "cap_sleeps", "quick_object_pulls"]

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
