"""``fedmm simulate`` runs Flower's engine in its own process (fedmm.runtime.embedded): the parts testable without a run."""

from __future__ import annotations

import io
import logging
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmm.config import RunConfig
from fedmm.errors import FederationError
from fedmm.runtime import embedded


def test_flowers_engine_takes_the_run_its_config_and_the_servers_context() -> None:
    # The private entry flwr-simulation calls; fedmm pins Flower, and this fails first if a new one changes it.
    run = embedded.engine()
    assert run.__name__ == "_run_simulation"


def test_the_run_config_reaches_every_app_fused_as_flwr_run_fuses_it() -> None:
    from flwr.common.config import get_fused_config_from_dir

    cfg = RunConfig(data="synthetic:200", sites=3, rounds=2, client_fraction=0.5)
    fused = get_fused_config_from_dir(embedded.find_app_dir(), dict(cfg.to_run_config()))
    assert RunConfig.from_run_config(fused) == cfg  # every key of pyproject.toml, the overrides on top


def test_a_run_needs_its_name_and_its_site_count() -> None:
    with pytest.raises(FederationError, match="run_name"):
        embedded.run_embedded(RunConfig(sites=2), on_line=print)
    with pytest.raises(FederationError, match="number of sites"):
        embedded.run_embedded(RunConfig(run_name="x"), on_line=print)


def test_flowers_log_reaches_the_caller_line_by_line_and_its_console_is_muted() -> None:
    logger = logging.getLogger("flwr")
    lines: list[str] = []
    kept = io.StringIO()
    console = [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    before, propagated = [h.level for h in console], logger.propagate  # (server.app, once imported, keeps Flower's lines from the root)
    with embedded._quiet_console(logger):
        assert all(h.level > logging.CRITICAL for h in console) and not logger.propagate
        handler = embedded._LineHandler(lines.append, kept)
        logger.addHandler(handler)
        try:
            logger.info("[fedmm] round 1/2: accuracy 0.5\nsecond line")
        finally:
            logger.removeHandler(handler)
    assert lines == ["INFO: [fedmm] round 1/2: accuracy 0.5", "second line"]
    assert "INFO: [fedmm] round 1/2" in kept.getvalue() and kept.getvalue().split()[0].replace(".", "").isdigit()  # stamped
    assert [h.level for h in console] == before and logger.propagate is propagated  # put back after the run


def test_every_process_that_carries_the_runs_ray_folder_is_stopped(tmp_path: Path) -> None:
    # Ray's workers outlive the raylet Ray shut down (their parent is then init): found by the run's private RAY_TMPDIR.
    marker = f"RAY_TMPDIR={tmp_path / 'ray'}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, "RAY_TMPDIR": str(tmp_path / "other")})
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")})
    try:
        time.sleep(0.2)
        embedded._stop_ours({other.pid}, marker + "\0")  # `other` counts as there before the run, and has another folder
        assert ours.wait(timeout=10) == -9
        assert other.poll() is None
    finally:
        for proc in (ours, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_simulate_offers_the_superlink_path_too() -> None:
    from typer.testing import CliRunner

    from fedmm.cli import app

    out = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--superlink" in out.output


class _Stop:
    """A stop event that lets ``sweeps`` sweeps run."""

    def __init__(self, sweeps: int) -> None:
        self.left = sweeps

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0

    def wait(self, _timeout: float) -> None:
        return None


def test_the_dispatcher_hands_out_each_pending_message_once_at_most_one_a_node_a_sweep() -> None:
    import threading
    from queue import Queue
    from types import SimpleNamespace

    class State:  # the parts of Flower's InMemoryLinkState the dispatcher reads
        def __init__(self) -> None:
            self.lock = threading.RLock()
            meta = [(1, "a"), (1, "b"), (2, "c"), (9, "not a simulated node"), (3, "expired")]
            self.message_ins_store = {name: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n, delivered_at="")) for n, name in meta}

        def _check_stored_messages(self, ids: set[str]) -> None:
            self.message_ins_store.pop("expired", None)  # as Flower drops an expired message

    state, queue = State(), Queue()  # type: ignore[var-annotated]
    nodes = {1: 0, 2: 1, 3: 2}
    embedded._deliver_pending(state, queue, nodes, _Stop(1))
    first = [queue.get_nowait().metadata.dst_node_id for _ in range(queue.qsize())]
    assert sorted(first) == [1, 2]  # one message a node a sweep, as Flower's own loop
    embedded._deliver_pending(state, queue, nodes, _Stop(1))
    second = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [m.metadata.dst_node_id for m in second] == [1] and second[0] is state.message_ins_store["b"]
    embedded._deliver_pending(state, queue, nodes, _Stop(1))
    assert queue.empty()  # everything delivered once; the message for an unknown node stays
    assert all(m.metadata.delivered_at for k, m in state.message_ins_store.items() if k != "not a simulated node")
    assert state.message_ins_store["not a simulated node"].metadata.delivered_at == ""


def test_the_fast_dispatcher_is_flowers_only_inside_a_run() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    original, flowers_queue = vce_api.add_messages_to_queue, vce_api.Queue
    with embedded.fast_delivery():
        assert vce_api.add_messages_to_queue is embedded._deliver_pending
        waiting = vce_api.Queue()
        started = time.monotonic()
        with pytest.raises(queue.Empty):
            waiting.get(timeout=1.0)  # what the engine's threads ask; they look at the stop event within 20 ms
        assert time.monotonic() - started < 0.5
        waiting.put("m")
        assert waiting.get(timeout=1.0) == "m"
    assert vce_api.add_messages_to_queue is original and vce_api.Queue is flowers_queue


class _Mutating:
    """A stand-in ClientApp: scribbles on what it is handed, replies with the node's call count."""

    def __call__(self, message: object, context: object) -> object:
        from flwr.app import ConfigRecord, Message, RecordDict

        message.content["config"]["lr"] = -1.0  # type: ignore[attr-defined]
        calls = int(context.state.config_records.get("calls", ConfigRecord({"n": 0}))["n"]) + 1  # type: ignore[attr-defined]
        context.state.config_records["calls"] = ConfigRecord({"n": calls})  # type: ignore[attr-defined]
        if message.content["config"].get("boom"):  # type: ignore[attr-defined]
            raise ValueError("site could not read its data")
        if message.content["config"].get("exit"):  # type: ignore[attr-defined]
            raise SystemExit(3)
        return Message(RecordDict({"reply": ConfigRecord({"calls": calls})}), reply_to=message)  # type: ignore[arg-type]


def _message_and_context(**config: object) -> tuple[object, object]:
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    message = Message(RecordDict({"config": ConfigRecord({"lr": 0.1, **config})}), dst_node_id=7, message_type="train")
    message.metadata.__dict__["_message_id"] = "m1"  # as the link state stamps a stored message
    return message, Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_sites_in_process_get_copies_and_their_errors_are_reported_as_from_a_ray_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.clientapp.client_app import ClientAppException
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # who makes messages (run_embedded sets it as flwr-simulation does)
        monkeypatch.setattr(TaskIdentity, name, 1)

    from fedmm.runtime.sites_in_process import InProcessBackend

    backend = InProcessBackend({})
    backend.build(_Mutating)
    assert backend.num_workers == 1 and backend.is_worker_idle()
    message, context = _message_and_context()
    reply, updated = backend.process_message(message, context)
    assert message.content["config"]["lr"] == 0.1  # the server's message is untouched: the site had a copy
    assert updated is not context and updated.state.config_records["calls"]["n"] == 1 and "calls" not in context.state.config_records
    assert reply.content["reply"]["calls"] == 1 and backend.is_worker_idle()
    again, _ = backend.process_message(message, updated)  # the engine hands back the updated context next time
    assert again.content["reply"]["calls"] == 2
    with pytest.raises(ClientAppException, match="could not read its data"):
        backend.process_message(*_message_and_context(boom=True))
    with pytest.raises(ClientAppException, match="exited"):  # not SystemExit: that would end the engine's only worker thread
        backend.process_message(*_message_and_context(exit=True))
    assert backend.is_worker_idle()  # a failed site does not hold the worker


def test_flowers_engine_runs_sites_in_process_only_inside_a_run() -> None:
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedmm.runtime.sites_in_process import InProcessBackend, sites_in_process

    original = raybackend.RayBackend
    with sites_in_process():
        assert raybackend.RayBackend is InProcessBackend
    assert raybackend.RayBackend is original


def test_the_run_leaves_start_up_objects_out_of_full_collections_and_puts_gc_back() -> None:
    import gc

    before = gc.get_threshold()
    gc.set_threshold(before[0], before[1], 1 << 30)  # as `fedmm simulate` defers them during its start-up
    try:
        survivor = [object() for _ in range(10)]
        with embedded.frozen_heap():
            assert gc.get_freeze_count() >= len(survivor)  # what existed before the run is frozen
            assert gc.get_threshold()[2] == 10  # full collections as usual during the run
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == (before[0], before[1], 1 << 30)
    finally:
        gc.set_threshold(*before)


def test_the_cli_defers_full_collections_only_while_simulate_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    import fedmm.cli as cli

    seen: list[int] = []
    monkeypatch.setattr(cli, "app", lambda: seen.append(gc.get_threshold()[2]) or 0)
    before = gc.get_threshold()
    for argv, deferred in ((["fedmm", "simulate"], True), (["fedmm", "status"], False)):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit):
            cli.main()
        assert (seen[-1] == cli.DEFERRED_FULL_COLLECTION) is deferred
        assert gc.get_threshold() == before
