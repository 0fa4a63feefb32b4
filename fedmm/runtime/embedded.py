"""``fedmm simulate`` in this process: Flower's own simulation engine, without a SuperLink.

``flwr run`` against a SuperLink (:mod:`fedmm.runtime.simulation`) pays, on every run, for
a SuperLink, a FAB build and install, a ``flwr-simulation`` process that imports Flower,
PyTorch and fedmm again and loads the data again, and a log stream polled over gRPC. The
engine under it is the same function either way: Flower's ``flwr-simulation`` process calls
``flwr.simulation.run_simulation._run_simulation`` with the app's folder, the run (its run
config as ``override_config``) and the ServerApp's :class:`Context`. This module makes that
call itself, so that:

- the ServerApp (``server.app:app``) runs in a thread of this process, with the run config
  fused from ``pyproject.toml`` and the overrides exactly as ``flwr run`` fuses them, and
  the data this process already loaded and checked is reused (fedmm's loaders cache per
  process), not loaded a second time;
- every virtual site (``clients.app:app``) gets the same fused run config, and runs in this
  process too (:mod:`fedmm.runtime.sites_in_process`), or with ``ray=True`` in Flower's Ray
  actors (one CPU each);
- the run's log is Flower's ``flwr`` logger, handed line by line to the caller;
- its outcome is the ServerApp's: ``finished:completed``, or ``finished:failed`` with the
  exception that ended it (no ``flwr ls`` needed);
- with ``ray=True``, Ray lives in a private temp folder, and every process it started is
  stopped by PID.

``flwr run .`` keeps working as before: this is a second way into the same App.
``_run_simulation`` is private to Flower; fedmm pins ``flwr==1.42.0`` and
:func:`engine` fails with a clear error if the function is not what this module expects.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from fedmm.config import RunConfig
from fedmm.errors import FederationError
from fedmm.runtime.grid import STOP_WAITING, paced
from fedmm.runtime.simulation import SimulationOutcome, _children, find_app_dir, sigterm_as_interrupt
from fedmm.runtime.sites_in_process import sites_in_process

__all__ = ["run_embedded", "engine"]

_SERVER_APP = "server.app:app"
_CLIENT_APP = "clients.app:app"
_OBJECT_STORE = 256 * 2**20  # bytes of Ray's shared-memory object store
_NEEDS = ("num_supernodes", "server_app_attr", "client_app_attr", "backend_config", "app_dir", "run", "server_app_context", "is_app")


def engine() -> Callable[..., Any]:
    """Flower's in-process simulation entry (the one ``flwr-simulation`` calls), checked for the arguments used here."""
    try:
        from flwr.simulation.run_simulation import _run_simulation
    except ImportError as err:  # pragma: no cover - only with another Flower than the pinned one
        raise FederationError(f"this Flower has no flwr.simulation.run_simulation._run_simulation ({err}); fedmm pins flwr==1.42.0") from err
    missing = [name for name in _NEEDS if name not in inspect.signature(_run_simulation).parameters]
    if missing:  # pragma: no cover - only with another Flower than the pinned one
        raise FederationError(f"Flower's _run_simulation lacks {missing}; fedmm pins flwr==1.42.0 (pip install 'flwr[simulation]==1.42.0')")
    return _run_simulation


class _LineHandler(logging.Handler):
    """Hands every record of Flower's logger to the caller as text lines, and keeps them in a file."""

    def __init__(self, on_line: Callable[[str], None], log_out: Any) -> None:
        super().__init__(logging.DEBUG)
        self.on_line, self.log_out = on_line, log_out
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a log line must never end the run
            return
        self.log_out.write(f"{record.relativeCreated / 1000:9.3f} {text}\n")  # seconds since this process started
        self.log_out.flush()
        for line in text.splitlines():
            self.on_line(line)


@contextmanager
def frozen_heap(full_threshold: int = 10) -> Iterator[None]:
    """For the run, leave what exists before it (PyTorch, Flower, the federation's data) out of
    Python's cyclic garbage collection (``gc.freeze``), with full collections at most every
    ``full_threshold`` middle-generation ones (Python's default, 10: ``fedmm simulate`` defers them
    during its start-up, :func:`fedmm.cli.main`); both as they were after the run.

    A full collection walks every tracked object; those from before the run are long-lived and
    are still freed when nothing refers to them (only cycles among them wait for the first full
    collection after the run).
    """
    young, middle, full = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(young, middle, min(full, full_threshold))
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(young, middle, full)


@contextmanager
def _quiet_console(logger: logging.Logger) -> Iterator[None]:
    """Flower's own console handler prints its whole log; the caller gets every line (``on_line``) and shows what it wants."""
    saved = [(h, h.level) for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for handler, _ in saved:
        handler.setLevel(logging.CRITICAL + 1)
    propagate, logger.propagate = logger.propagate, False  # Opacus' import puts a DEBUG handler on the root logger
    try:
        yield
    finally:
        logger.propagate = propagate
        for handler, level in saved:
            handler.setLevel(level)


@contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment variables for the run (Ray's workers inherit them), and put the old values back."""
    old = {k: os.environ.get(k) for k in values}
    for key, wanted in values.items():
        if wanted is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = wanted
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _stop_ours(before: set[int], marker: str) -> None:
    """Kill (by PID) what this run started: new descendants of this process, and every process whose
    environment holds this run's private ``RAY_TMPDIR`` (Ray's workers, orphaned once Ray shut its raylet down)."""
    mine = set(_children(os.getpid())) - before
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes():
                    mine.add(int(entry.name))
            except OSError:
                continue
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_embedded(cfg: RunConfig, *, on_line: Callable[[str], None], verbose: bool = False, ray: bool = False) -> SimulationOutcome:
    """Run ``cfg`` as a Flower simulation of ``cfg.sites`` virtual sites, the engine in this process.

    The sites run in this process, one at a time (:mod:`fedmm.runtime.sites_in_process`), or
    with ``ray`` in Flower's Ray actors, one CPU each. ``on_line`` receives every line of
    Flower's log (``verbose``: Ray's workers print theirs to this process's output too). The run folder is
    ``cfg.runs_dir / cfg.run_name`` (``run_name`` must be set); Flower's log is kept there
    as ``flower.log``.
    """
    if not cfg.run_name:
        raise FederationError("run_embedded needs cfg.run_name to know the run folder")
    if cfg.sites is None:
        raise FederationError("run_embedded needs the number of sites resolved (sites=auto is resolved by `fedmm simulate` from the data)")
    run_simulation = engine()
    from flwr.app import Context, RecordDict
    from flwr.app.user_config import UserConfig
    from flwr.common.config import get_fused_config_from_dir
    from flwr.supercore.run import Run

    app_dir = find_app_dir()
    run_dir = Path(cfg.runs_dir).resolve() / cfg.run_name
    overrides: UserConfig = dict(cfg.replace(runs_dir=str(Path(cfg.runs_dir).resolve())).to_run_config())
    run_id = int.from_bytes(os.urandom(7), "big")
    run = Run.create_empty(run_id=run_id)
    run.override_config = overrides
    run.primary_task_id = int.from_bytes(os.urandom(7), "big")
    run.federation_id = _noop_federation()
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    # Who this process is to Flower's stores (flwr-simulation sets it from the task it pulls from its SuperLink).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run.primary_task_id, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config=UserConfig(), state=RecordDict(),
                      run_config=get_fused_config_from_dir(app_dir, overrides))
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        # Messages in flight are a few models (one per actor, each way): a small object store is plenty.
        "init_args": {"logging_level": "WARNING", "log_to_driver": verbose, "include_dashboard": False, "object_store_memory": _OBJECT_STORE},
    }
    work = Path(tempfile.mkdtemp(prefix="fedmm-sim-"))
    (work / "ray").mkdir()
    log_file = work / "flower.log"
    before = set(_children(os.getpid()))
    status, details = "finished:completed", ""
    flwr_logger = logging.getLogger("flwr")
    env: dict[str, str | None] = {
        "RAY_ADDRESS": None,  # a private Ray: a RAY_ADDRESS left in the shell must not attach this run to someone's cluster
        "RAY_TMPDIR": str(work / "ray"), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "MALLOC_ARENA_MAX": "2",  # Ray's many-threaded workers otherwise keep a malloc arena per thread
    }
    try:  # the private folder goes whatever happens (an interrupt included)
        started = time.monotonic()
        sites = nullcontext() if ray else sites_in_process()
        with open(log_file, "w", encoding="utf-8") as log_out, _environment(env), _quiet_console(flwr_logger), fast_delivery(), sites, frozen_heap():
            handler = _LineHandler(on_line, log_out)
            flwr_logger.addHandler(handler)
            STOP_WAITING.clear()
            try:
                with sigterm_as_interrupt():
                    run_simulation(
                        num_supernodes=cfg.sites, server_app_attr=_SERVER_APP, client_app_attr=_CLIENT_APP, backend_name="ray",
                        backend_config=backend, app_dir=str(app_dir), run=run, server_app_context=context, is_app=True,
                        exit_event=_exit_event(), verbose_logging=False,
                    )
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Flower's engine has stopped; stop the ServerApp's wait too
                status, details = "finished:interrupted", "interrupted (Ctrl-C, SIGTERM or SIGHUP)"
                log_out.write(f"run {details}\n")
                _stop_server_app()
            except SystemExit as stop:  # Flower's flwr_exit on an app that cannot be loaded
                status, details = "finished:failed", f"Flower exited with code {stop.code} (the app could not be loaded); see flower.log"
            except Exception as err:  # noqa: BLE001 - the ServerApp's failure is the run's outcome, reported as such
                status, details = "finished:failed", f"{type(err).__name__}: {err}"
                cause = err.__cause__
                if cause is not None:
                    details += f" ({type(cause).__name__}: {cause})"
                log_out.write(f"run failed: {details}\n")
            finally:
                flwr_logger.removeHandler(handler)
                _stop_ray()
                _stop_ours(before, f"RAY_TMPDIR={env['RAY_TMPDIR']}\0")
            log_out.write(f"simulation engine ran {time.monotonic() - started:.1f} s\n")
        kept_log = run_dir / "flower.log" if run_dir.is_dir() else Path(cfg.runs_dir).resolve() / f"{cfg.run_name}.flower.log"
        kept_log.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_file, kept_log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return SimulationOutcome(str(run_id), status, details, run_dir, kept_log)


def _deliver_pending(state: Any, queue: Any, nodes: Any, f_stop: Any) -> None:
    """Flower's ``vce_api.add_messages_to_queue``, in one pass over the pending messages.

    Flower's own loop asks the link state, for every simulated node, for that node's next message,
    and each ask scans every stored message: nodes x messages per sweep, 10^7 checks at 10,000
    sites asking 1,000, which starves the ServerApp's thread. This hands out the same messages
    (undelivered, still valid by Flower's own check, at most one per node per sweep, marked
    delivered as Flower marks them) from a single scan. Flower's loop is used if the link state
    is not the in-memory one this was written against (``flwr==1.42.0``).
    """
    from flwr.supercore.date import now

    if not all(hasattr(state, name) for name in ("message_ins_store", "lock", "_check_stored_messages")):
        _FLOWER_DELIVERY[0](state, queue, nodes, f_stop)
        return
    known = set(nodes.keys())
    while not f_stop.is_set():
        out = []
        with state.lock:
            ids = list(state.message_ins_store.keys())
            state._check_stored_messages(set(ids))  # expired or foreign messages go, as Flower drops them
            taken: set[int] = set()
            for msg_id in ids:
                msg = state.message_ins_store.get(msg_id)
                if msg is None or msg.metadata.delivered_at != "":
                    continue
                node = msg.metadata.dst_node_id
                if node in known and node not in taken:
                    taken.add(node)
                    out.append(msg)
            stamp = now().isoformat()
            for msg in out:
                msg.metadata.delivered_at = stamp
        for msg in out:
            queue.put(msg)
        f_stop.wait(paced(_SWEEP, len(ids)))


_FLOWER_DELIVERY: list[Callable[..., None]] = []
_SWEEP = 0.02  # seconds between hand-outs (Flower's loop: 0.1); a round's messages wait at most this long


@contextmanager
def fast_delivery() -> Iterator[None]:
    """Use :func:`_deliver_pending` as the simulation engine's dispatcher while the block runs."""
    from flwr.server.superlink.fleet.vce import vce_api

    original, original_queue = vce_api.add_messages_to_queue, vce_api.Queue
    _FLOWER_DELIVERY[:] = [original]
    setattr(vce_api, "add_messages_to_queue", _deliver_pending)  # noqa: B010 - the same call, with loose types
    setattr(vce_api, "Queue", _PromptQueue)  # noqa: B010 - the engine's two queues, made when a run starts
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original
        setattr(vce_api, "Queue", original_queue)  # noqa: B010


class _PromptQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue whose timed ``get`` waits at most :data:`_SWEEP` seconds.

    The engine's worker and reply threads wait on their queues with a 1 s timeout before they
    look at the stop event, so a finished run waited up to a second for them; they now look
    every 20 ms (and a message that arrives is still taken at once).
    """

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return super().get(block, timeout if timeout is None else min(timeout, _SWEEP))


def _noop_federation() -> str:
    from flwr.supercore.constant import NOOP_FEDERATION_ID  # the federation a simulation runs in (as flwr-simulation sets it)

    return str(NOOP_FEDERATION_ID)


def _stop_server_app(timeout: float = 30.0) -> None:
    """End the ServerApp's thread after an interrupt: its wait for replies ends (``STOP_WAITING``:
    :class:`fedmm.runtime.grid.RunStopped`), and the thread is given ``timeout`` seconds to finish."""
    STOP_WAITING.set()
    end = time.monotonic() + timeout
    for thread in threading.enumerate():
        if "server_th" in thread.name and thread is not threading.current_thread():
            thread.join(max(0.0, end - time.monotonic()))


def _exit_event() -> Any:
    from flwr.supercore.telemetry import EventType

    return EventType.FLWR_SIMULATION_RUN_LEAVE


def _stop_ray() -> None:
    """Flower's backend shuts Ray down when the run ends normally; make sure of it when it did not."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - the processes are killed by PID next
        pass
