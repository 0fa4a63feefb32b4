"""A Flower Grid that notices replies promptly.

Flower 1.42's HTTP grid (the ServerApp's link to the SuperLink) sleeps a fixed 3 s between
pulls while it waits for replies; a SecAgg+ round waits for four sets of replies, so that
alone adds about 6 s a round on average. :class:`PromptGrid` uses the same public Grid
calls (``push_messages`` / ``pull_messages``) and pulls every ``interval`` seconds. When
the grid is Flower's HTTP grid (a deployed run), its fetching of a reply's arrays also
retries within 20 ms rather than after 1 s (:func:`fedmm.runtime.flower_waits.quick_object_pulls`).

Given a :class:`fedmm.federation.presence.Presence`, it reports every reply heard (and Flower's
"Node Unavailable" errors) and, about once a second while it waits, the SuperLink's set of
online nodes: a site that dies mid-round is named lost seconds after its heartbeats stop.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedmm.errors import FederationError
from fedmm.federation.presence import Presence

__all__ = ["PromptGrid", "RunStopped", "STOP_WAITING", "paced"]

# Set when the process stops a run it hosts (``fedmm simulate`` on Ctrl-C or SIGTERM): a ServerApp
# waiting for replies that will never come stops waiting (:class:`RunStopped`), so its thread ends.
STOP_WAITING = threading.Event()


class RunStopped(FederationError):
    """The run was stopped from outside (Ctrl-C or SIGTERM) while the ServerApp waited for replies."""


def paced(interval: float, in_flight: int) -> float:
    """Seconds until the next look at ``in_flight`` messages: ``interval`` for a few dozen, up to 5x it
    for hundreds (each look goes over all of them, and takes the interpreter from the site that trains)."""
    return interval * min(5.0, max(1.0, in_flight / 64))


class PromptGrid(Grid):
    """Wraps a Grid; only ``send_and_receive`` differs (a shorter pull interval)."""

    NODES_EVERY = 1.0  # seconds between asks for the online nodes while waiting for replies

    def __init__(self, grid: Grid, interval: float | None = None, *, presence: Presence | None = None) -> None:
        self._grid = grid
        self.presence = presence
        # FEDMM_FLOWER_WAITS=flower keeps Flower's own pace (the latency benchmark's "before").
        flower_pace = os.environ.get("FEDMM_FLOWER_WAITS", "") == "flower"
        # In a simulation the grid is Flower's in-memory one: a pull is a dict lookup, so look often.
        in_memory = type(grid).__module__ == "flwr.superlink.grid.inmemory_grid"
        self.interval = interval if interval is not None else (3.0 if flower_pace else 0.02 if in_memory else 0.1)
        if type(grid).__module__ == "flwr.superlink.grid.http_grid" and not flower_pace:
            from fedmm.runtime.flower_waits import quick_object_pulls

            quick_object_pulls(sys.modules[type(grid).__module__])

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self._grid.get_node_ids())
        if self.presence is not None:
            self.presence.online(nodes)
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        to_node = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}  # an error reply comes from the SuperLink, not the node
        waiting = set(ids)
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        asked = time.monotonic()
        while waiting and (timeout is None or time.monotonic() < end):
            if STOP_WAITING.is_set():
                raise RunStopped(f"the run was stopped (Ctrl-C or SIGTERM) while {len(waiting)} of {len(ids)} replies were awaited")
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if self.presence is not None:
                for reply in got:
                    node = to_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                    self.presence.heard(node, error=reply.error.reason if reply.has_error() else None)
                if waiting and time.monotonic() - asked >= self.NODES_EVERY:
                    asked = time.monotonic()
                    self.get_node_ids()
            if waiting:
                STOP_WAITING.wait(paced(self.interval, len(waiting)))
        if self.presence is not None:
            self.presence.flush()
        return replies
