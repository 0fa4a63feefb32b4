"""Flower's ``flower-supernode``, with its fixed waits shortened (:mod:`fedmm.runtime.flower_waits`).

``fedmm site`` runs the site's SuperNode as ``python -m fedmm.runtime.supernode ARGS``: Flower's own
``flower-supernode`` entry point with the same arguments, TLS, authentication and protocol.
Before it starts, its idle poll of the SuperLink (3 s in Flower 1.42) and its wait for the
ClientApp's reply (0.5 s) are capped at ``FEDMM_SUPERNODE_POLL_INTERVAL`` seconds (the site
file's ``poll-interval``), and its fetching of a message's arrays retries within 20 ms
rather than after 1 s. The price is one small request to the SuperLink per interval while
the site is idle. Its heartbeat interval becomes ``FEDMM_SUPERNODE_HEARTBEAT_INTERVAL`` seconds
(the site file's ``heartbeat-interval``, default 3; Flower's is 30), so that the server names
the site lost about two intervals after it dies (:func:`fedmm.runtime.flower_waits.short_heartbeats`;
fedmm's SuperLink accepts it).
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["HEARTBEAT_ENV", "POLL_ENV", "main"]

POLL_ENV = "FEDMM_SUPERNODE_POLL_INTERVAL"
HEARTBEAT_ENV = "FEDMM_SUPERNODE_HEARTBEAT_INTERVAL"


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedmm.runtime.flower_waits import cap_sleeps, quick_object_pulls, short_heartbeats

    raw = os.environ.get(POLL_ENV, "")
    # A SuperNode that waits for a message's arrays cannot receive anything else: give up after
    # 30 s (the server pushes them right after the message; Flower's own limit is 2 h).
    heartbeat = os.environ.get(HEARTBEAT_ENV, "")
    patched = quick_object_pulls(start_client_internal, max_time=30.0) and (not raw or cap_sleeps(start_client_internal, float(raw)))
    patched = patched and (not heartbeat or short_heartbeats(float(heartbeat)))
    if not patched:
        warnings.warn("this Flower's SuperNode loop is not the one fedmm knows (1.42); its own waits apply", RuntimeWarning, stacklevel=1)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
