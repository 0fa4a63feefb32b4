"""Run a simulation's virtual sites in the simulating process: Flower's engine, no Ray workers.

Flower's simulation engine (``flwr.server.superlink.fleet.vce``) hands each message for a
virtual site to a *backend*, which runs the site's ClientApp and returns its reply and
context. Flower ships one backend, Ray: a pool of actor processes, one CPU each. Each actor
imports PyTorch, Opacus, Flower and fedmm again and loads its sites' data again before its
first reply: 10-30 s of a run on a small machine, and a copy of the federation in every
actor (see docs/benchmarks.md, Scaling).

:class:`InProcessBackend` is the same contract run in this process: the engine's worker
thread calls the ClientApp directly, one site at a time, and PyTorch uses every core for
that site (as a plain training loop does). The ClientApp gets a copy of the message and of
the site's context (as a Ray actor gets them, pickled), so a site never holds the server's
objects, and an exception in a site is reported as Flower reports one from a Ray actor.
Everything else (scheduling, link state, contexts, the ServerApp) is Flower's engine.

A simulation has one operator: its sites' data and the server share this process's memory,
as they shared one machine (or one Ray cluster) before. Privacy between real sites and their
server is a deployment's (``fedmm site``: each site in its own process on its own machine).

``fedmm simulate`` uses it by default; ``--ray`` (or a Ray cluster) uses Flower's Ray backend.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.server.superlink.fleet.vce.backend import Backend

__all__ = ["InProcessBackend", "sites_in_process"]


class InProcessBackend(Backend):
    """A Flower simulation backend with one worker: the ClientApp called in this process."""

    def __init__(self, backend_config: Any) -> None:
        super().__init__(backend_config)
        self._app_fn: Callable[[], Any] | None = None
        self._busy = threading.Lock()

    def build(self, app_fn: Callable[[], Any]) -> None:
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return not self._busy.locked()

    def terminate(self) -> None:
        self._app_fn = None

    def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
        """Run the site's ClientApp on a copy of ``message`` and ``context``; its reply and updated context."""
        from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

        if self._app_fn is None:
            raise ValueError("InProcessBackend.process_message was called before build(app_fn): Flower's engine builds its backend first; call build() with the ClientApp loader")
        message, context = pickle.loads(pickle.dumps((message, context)))
        with self._busy:
            try:
                reply = self._app_fn()(message=message, context=context)
            except LoadClientAppError:
                raise
            except Exception as ex:  # reported as Flower reports a Ray actor's: an Error reply naming the exception
                raise ClientAppException(str(ex)) from ex
            except SystemExit as ex:  # a site's sys.exit() ends that site's call, as it ends a Ray actor, not the engine's worker
                raise ClientAppException(f"the site's ClientApp exited (code {ex.code})") from ex
        return reply, context


@contextmanager
def sites_in_process() -> Iterator[None]:
    """While the block runs, Flower's simulation engine runs its sites with :class:`InProcessBackend`.

    Flower's ``start_vce`` builds its backend from ``raybackend.RayBackend`` (the module
    attribute, looked up when the run starts); this points that name at the in-process
    backend for the block and restores it afterwards.
    """
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    setattr(raybackend, "RayBackend", InProcessBackend)  # noqa: B010 - Flower's only backend slot
    try:
        yield
    finally:
        setattr(raybackend, "RayBackend", original)  # noqa: B010
