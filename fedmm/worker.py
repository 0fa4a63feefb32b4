"""A site's long-lived worker: the data, the model code and PyTorch stay loaded between rounds.

A Flower SuperNode starts a fresh ClientApp process for every message, and the four
messages of a SecAgg+ round would each pay for importing PyTorch and fedmm and for
loading the site's data again. ``fedmm site`` therefore also starts this worker next to
the SuperNode; the ClientApp (which then imports only Flower) hands the training stage to
it over a local socket, authenticated with a key only the site's own user can read
(``multiprocessing.connection``: HMAC challenge, then pickled plain data).

Everything privacy-relevant (policy, ledger, training, clipping, noise) runs in the
worker exactly as it would in the ClientApp: :func:`fedmm.site_round.run_round`.
"""

from __future__ import annotations

import os
import secrets
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

__all__ = ["WORKER_SOCKET", "WORKER_KEY", "serve", "call", "make_key"]

WORKER_SOCKET = "worker.sock"
WORKER_KEY = "worker.key"


def make_key(state_dir: Path) -> bytes:
    """Create (or read) the worker's authentication key, readable by the site's user only."""
    path = Path(state_dir) / WORKER_KEY
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path.read_bytes()


def serve(state_dir: Path, *, ready: Path | None = None) -> None:
    """Answer round requests on ``state_dir/worker.sock`` until killed."""
    from fedmm.site_round import run_round  # the heavy imports, once

    state_dir = Path(state_dir)
    address = str(state_dir / WORKER_SOCKET)
    if os.path.exists(address):
        os.unlink(address)  # a stale socket from a worker that was killed
    with Listener(address, family="AF_UNIX", authkey=make_key(state_dir)) as listener:
        os.chmod(address, 0o600)
        if ready is not None:
            ready.write_text(str(os.getpid()))
        while True:
            try:
                with listener.accept() as conn:
                    request = conn.recv()
                    try:
                        conn.send(("ok", run_round(request)))
                    except Exception as err:  # the ClientApp re-raises it, so Flower reports the site's error
                        conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc()))
            except (EOFError, ConnectionError, OSError):
                continue  # a ClientApp that went away mid-request: wait for the next one


def call(state_dir: str | Path, request: Any) -> Any:
    """Send ``request`` to the site's worker and return its response (raising its error)."""
    from fedmm.errors import FederationError

    state_dir = Path(state_dir)
    address = str(state_dir / WORKER_SOCKET)
    try:
        with Client(address, family="AF_UNIX", authkey=(state_dir / WORKER_KEY).read_bytes()) as conn:
            conn.send(request)
            reply = conn.recv()
    except (OSError, EOFError) as err:
        raise FederationError(
            f"the site's worker at {address} did not answer ({err}). Fix: start the site with 'fedmm site CONFIG', which starts it"
        ) from err
    if reply[0] == "ok":
        return reply[1]
    raise FederationError(f"site worker: {reply[1]}")


if __name__ == "__main__":  # started by `fedmm site`: python -m fedmm.worker STATE_DIR
    import sys

    directory = Path(sys.argv[1])
    serve(directory, ready=directory / "worker.ready")
