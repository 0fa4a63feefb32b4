"""Flower's ``flower-superlink``, accepting the short heartbeats of fedmm's sites.

``fedmm server`` runs its SuperLink as ``python -m fedmm.runtime.superlink ARGS``: Flower's own
entry point with the same arguments, TLS, authentication, database and protocol. The one
change: a SuperNode may announce a heartbeat interval down to 1 s (Flower refuses below
10 s), so that a site that dies is declared offline, and its pending messages answered with
"Node Unavailable", within seconds (:func:`fedmm.runtime.flower_waits.short_heartbeats`).
Sites that keep Flower's interval (30 s, ``runtime = "flower"``) are served as before.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["main"]


def main() -> None:
    from flwr.superlink.cli import flower_superlink

    from fedmm.runtime.flower_waits import accept_short_heartbeats

    if not accept_short_heartbeats():
        warnings.warn("this Flower's SuperLink is not the one fedmm knows (1.42): sites must use heartbeat-interval >= 10", RuntimeWarning, stacklevel=1)
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
