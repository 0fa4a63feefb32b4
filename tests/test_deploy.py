"""Deployment faults: the server resumes from its checkpoint, sites reconcile with their ledgers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

import server.app as server_app
from clients.app import app as client_app
from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.errors import ConfigError
from fedmm.privacy.audit import audit_ledger
from fedmm.privacy.ledger import find_ledgers
from fedmm.runtime.local import LocalGrid, stage_of


class ServerKilled(Exception):
    """Stands for the server process dying at that moment."""


def _run(cfg: RunConfig, *, kill_at: tuple[int, str] | None = None) -> None:
    run_config = cfg.to_run_config()
    seen: dict[str, int] = {}

    def kill(node: int, msg: Message) -> bool:
        stage = stage_of(msg)
        plain = msg.content.config_records.get(protocol.CONFIG)  # Flower's new API sends no group id; fedmm's config has the round
        round_ = int(plain[protocol.SERVER_ROUND]) if plain is not None else int(msg.metadata.group_id)  # type: ignore[call-overload]
        if kill_at is not None and (round_, stage) == kill_at:
            raise ServerKilled(f"killed at round {round_}, stage {stage}")
        seen[stage] = seen.get(stage, 0) + 1
        return False

    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": cfg.sites} for i in range(cfg.sites)], run_config, drop=kill)
    server_app.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))


@pytest.mark.parametrize("secure", [False, True])
def test_a_server_killed_between_rounds_resumes_from_its_checkpoint(tmp_path: Path, secure: bool) -> None:
    cfg = RunConfig(data="synthetic:300", sites=3, rounds=3, runs_dir=str(tmp_path), run_name="run", secure_aggregation=secure, noise_multiplier=1.5, target_epsilon=50.0)
    first_stage = "setup" if secure else "plain"

    with pytest.raises(ServerKilled):
        _run(cfg, kill_at=(3, first_stage))  # dies after round 2's checkpoint, before round 3 reaches a site
    checkpoint = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert checkpoint["round"] == 2

    _run(cfg.replace(resume=True))

    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["stopped"] is None and summary["unaggregated_spends"] == {}
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    sites = {s["site"]: s for s in json.loads((run / "privacy.json").read_text())["sites"]}
    for path in find_ledgers([run / "sites"]):
        report = audit_ledger(path)
        assert report.ok and [e["round"] for e in report.entries] == [1, 2, 3]  # each round spent once: no double spend
        assert sites[report.site]["epsilon"] == pytest.approx(report.entries[-1]["epsilon"])  # and none lost


def test_spends_of_a_round_lost_with_the_server_are_kept_and_counted(tmp_path: Path) -> None:
    cfg = RunConfig(data="synthetic:300", sites=3, rounds=3, runs_dir=str(tmp_path), run_name="run", secure_aggregation=True, noise_multiplier=1.5, target_epsilon=50.0)

    with pytest.raises(ServerKilled):
        _run(cfg, kill_at=(3, "unmask"))  # the sites trained round 3 and sent masked updates; the server died before unmasking

    _run(cfg.replace(resume=True))

    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 3 and sorted(summary["unaggregated_spends"].values()) == [1, 1, 1]
    sites = {s["site"]: s for s in json.loads((run / "privacy.json").read_text())["sites"]}
    for path in find_ledgers([run / "sites"]):
        report = audit_ledger(path)
        assert report.ok and [e["round"] for e in report.entries] == [1, 2, 3, 3]  # round 3 was trained twice: both spends count
        assert sites[report.site]["epsilon"] == pytest.approx(report.entries[-1]["epsilon"])


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no run folder .* to resume"):
        _run(RunConfig(data="synthetic:300", sites=3, rounds=2, runs_dir=str(tmp_path), run_name="none", resume=True))


# ---------------------------------------------------------------------------------------
# The real thing on loopback: `fedmm server`, three `fedmm site` processes, `flwr run`.

from fedmm.runtime.loopback import CLI_POLL, LoopbackDeployment

SITES = ("george", "jackson", "lucas")


def _metrics_rounds(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


def _checkpoint_round(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoint.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def test_loopback_deployment_survives_a_lost_site_and_a_server_restart(tmp_path: Path) -> None:
    deploy = LoopbackDeployment(tmp_path)
    runs = tmp_path / "runs"
    run_config = (
        f"data='synthetic:600' rounds=3 sites=3 secure-aggregation=true secagg-timeout=60.0 noise-multiplier=1.5 target-epsilon=50.0 min-sites=2 "
        f"runs-dir='{runs}' run-name='deploy'"
    )
    try:
        deploy.start_federation(SITES, site_lines='data = "synthetic:200"\n')  # TLS, registered keys, each site its own data
        first = deploy.submit(run_config)
        run = runs / "deploy"
        deploy.wait_for("round 1", lambda: 1 in _metrics_rounds(run))
        deploy.kill("lucas")  # SIGKILL mid-round 2: its SuperNode and its ClientApp executor
        deploy.wait_for("round 2 without lucas", lambda: 2 in _metrics_rounds(run))
        # the round's metrics line is written just before its checkpoint: wait for the checkpoint (a kill in between was a flake)
        deploy.wait_for("round 2's checkpoint", lambda: _checkpoint_round(run) >= 2, timeout=30)
        deploy.kill("server")  # SIGKILL after round 2's checkpoint: SuperLink, ServerApp and all

        deploy.start("server", *deploy.server_args)  # same database: the registered sites come back by themselves
        deploy.wait_for("two sites back online", lambda: deploy.online() >= 2, interval=CLI_POLL)
        second = deploy.submit(run_config.replace("sites=3", "sites=2") + " resume=true")
        deploy.wait_for("the resumed run to finish", lambda: deploy.run_status(second).startswith("finished"), timeout=300, interval=CLI_POLL)
        status = deploy.run_status(second)
        assert status == "finished:completed", f"resumed run {status}\n--- ServerApp\n{deploy.server_log(second)[-6000:]}\n{deploy.logs()}"
        # The deployed server checked every report's claim to its site's name against the enrolled keys.
        assert "every report proves its site's name with one of 3 enrolled keys" in deploy.server_log(second)
        assert deploy.run_status(first) != "finished:completed"  # the first run died with its server
    finally:
        deploy.stop_all()

    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["sites"] == 3 and rounds[1]["sites"] == 2 and rounds[1]["dropped"] == 1 and rounds[2]["sites"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["secure_aggregation"] is True and summary["stopped"] is None
    reported = {s["site"]: s for s in json.loads((run / "privacy.json").read_text())["sites"]}
    for site in SITES:
        report = audit_ledger(tmp_path / "state" / site / "ledger.sqlite")
        assert report.ok, report  # the chain verifies, lucas's too
        trained = [e["round"] for e in report.entries]
        if site == "lucas":
            assert trained[0] == 1 and len(trained) <= 2  # killed in round 2: it may or may not have recorded that spend
            continue
        # Every spend is in the ledger once; a round the dead server never aggregated shows as an
        # extra entry, counted by the resumed server, and the server's final figure is the ledger's.
        assert trained[:2] == [1, 2] and trained[-1] == 3
        assert len(trained) - 3 == summary["unaggregated_spends"].get(site, 0)
        assert reported[site]["epsilon"] == pytest.approx(report.entries[-1]["epsilon"])
    assert not [p for p in deploy.processes.values() if p.poll() is None]


def _site_file(tmp_path: Path, extra: str = "", *, drop: str = "") -> Path:
    from fedmm.secure.certs import create_site_keys, init_certificates

    pki = tmp_path / "site-pki"
    if not pki.exists():
        init_certificates(pki)
        create_site_keys(pki, ["george"])
    shutil.copy(pki / "ca.crt", tmp_path / "ca.crt")
    shutil.copy(pki / "sites" / "george.key", tmp_path / "george.key")
    lines = {
        "name": '"george"', "superlink": '"127.0.0.1:9092"', "ca": '"ca.crt"', "key": '"george.key"',
        "state-dir": '"state"', "epsilon-budget": "8.0",
    }
    text = "[site]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items() if k != drop) + extra
    path = tmp_path / "george.toml"
    path.write_text(text)
    return path


def test_a_site_file_becomes_its_node_config(tmp_path: Path) -> None:
    from fedmm.runtime.deploy import SiteSettings, executor_command, supernode_command

    site = SiteSettings.load(_site_file(tmp_path, "min-noise-multiplier = 0.8\nrequire-dp = false\n"))

    command = supernode_command(site)
    node_config = command[command.index("--node-config") + 1]
    assert f"site='george' state-dir='{tmp_path / 'state'}' epsilon-budget=8.0" in node_config
    assert f"min-noise-multiplier=0.8 min-batch-size=16 require-dp=false key='{tmp_path / 'george.key'}'" in node_config
    assert command[command.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert "--insecure" not in command
    # runtime "fedmm" (the default): Flower's process isolation, served by the site's own executor
    assert command[1:5] == ["-m", "fedmm.runtime.supernode", "--isolation", "process"]
    secret = command[command.index("--superexec-auth-secret-file") + 1]
    executor = executor_command(site)
    assert executor[executor.index("--secret-file") + 1] == secret
    assert executor[executor.index("--runtime-api-address") + 1] == f"127.0.0.1:{site.clientapp_port}"


def test_runtime_flower_is_flowers_own_supernode(tmp_path: Path) -> None:
    from fedmm.runtime.deploy import SiteSettings, supernode_command

    command = supernode_command(SiteSettings.load(_site_file(tmp_path, 'runtime = "flower"\n')))
    assert command[0].endswith("flower-supernode")
    assert "--isolation" not in command and "--superexec-auth-secret-file" not in command


@pytest.mark.parametrize(
    ("extra", "drop", "message"),
    [
        ("", "epsilon-budget", "site.epsilon-budget.*missing"),
        ("budget = 3\n", "", "site.budget.*unknown key"),
        ("", "", None),
        ('data = "manifest:nowhere.csv"\n', "", "site.data.*manifest not found"),
        ("delta = 2.0\n", "", "site.delta"),
        ('runtime = "ray"\n', "", "site.runtime.*must be one of fedmm, flower"),
        ("poll-interval = 0\n", "", "site.poll-interval"),
        # issue 17: these loaded and failed only at round time, or read "false" as true
        ("min-noise-multiplier = -5.0\n", "", "site.min-noise-multiplier.*must be a number >= 0"),
        ('require-dp = "false"\n', "", "site.require-dp.*without quotes"),
        ('clientapp-port = "9094"\n', "", "site.clientapp-port.*an integer"),
        ("clientapp-port = 70000\n", "", "site.clientapp-port.*port number"),
        ("heartbeat-interval = 0.5\n", "", "site.heartbeat-interval.*\\[1, 30\\]"),
        ('heartbeat-interval = "3"\n', "", "site.heartbeat-interval"),
        # new-user findings of 3 Dec: a site file's typo got no suggestion; lenient is the site's own setting now
        ("epsilon_budget = 3\n", "", "site.epsilon_budget.*unknown key.*did you mean 'epsilon-budget'"),
        ('lenient = "yes"\n', "", "site.lenient.*true or false"),
    ],
)
def test_a_bad_site_file_is_refused_with_the_key_and_a_fix(tmp_path: Path, extra: str, drop: str, message: str | None) -> None:
    from fedmm.runtime.deploy import SiteSettings

    path = _site_file(tmp_path, extra, drop=drop)
    if message is None:  # the CA file is missing
        (tmp_path / "ca.crt").unlink()
        message = "site.ca.*file not found"
    with pytest.raises(ConfigError, match=message):
        SiteSettings.load(path)


def test_flowers_fixed_waits_are_still_where_fedmm_shortens_them(tmp_path: Path) -> None:
    """The pinned Flower still has the loops fedmm.runtime.flower_waits patches; an upgrade that moves them fails here."""
    import functools
    import time
    import types

    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    from fedmm.runtime.flower_waits import OBJECT_PULL_BACKOFF, cap_sleeps, quick_object_pulls

    assert start_client_internal.time is time and "time.sleep(3)" in Path(start_client_internal.__file__).read_text()
    for module in (start_client_internal, http_grid):
        fresh = types.ModuleType("copy")
        fresh.pull_objects = module.pull_objects
        assert quick_object_pulls(fresh) and quick_object_pulls(fresh)  # idempotent
        assert isinstance(fresh.pull_objects, functools.partial) and fresh.pull_objects.keywords == OBJECT_PULL_BACKOFF
    fresh = types.ModuleType("copy")
    fresh.pull_objects = start_client_internal.pull_objects
    assert quick_object_pulls(fresh, max_time=30.0) and fresh.pull_objects.keywords["max_time"] == 30.0
    fresh = types.ModuleType("copy")
    fresh.time = time
    assert cap_sleeps(fresh, 0.05)
    started = time.monotonic()
    fresh.time.sleep(3)
    assert time.monotonic() - started < 1.0
    assert fresh.time.time() > 0  # everything else is the time module
    assert not quick_object_pulls(types.ModuleType("unrelated")) and not cap_sleeps(types.ModuleType("unrelated"), 0.1)
    with pytest.raises(ValueError, match="between 0.01 and 3"):
        cap_sleeps(fresh, 0)


def test_the_executor_secret_is_the_sites_alone(tmp_path: Path) -> None:
    from fedmm.runtime.executor import make_secret

    path = make_secret(tmp_path / "state")
    secret = path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o600 and len(secret) == 64
    assert make_secret(tmp_path / "state").read_bytes() == secret  # kept across restarts


def test_a_task_the_supernode_dropped_ends_that_task_not_the_executor() -> None:
    """Flower's own retries SIGINT their process on ``401``; in the long-lived executor that would stop every task."""
    import signal
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse

    from fedmm.runtime.executor import _OwnClientApp, _task_heartbeat_fn, run_task

    class RevokedToken(BaseHTTPRequestHandler):  # a SuperNode that no longer knows the task's token
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _frame: interrupted.append(number))
    server = ThreadingHTTPServer(("127.0.0.1", 0), RevokedToken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status = run_task(f"127.0.0.1:{server.server_address[1]}", "a-dropped-token", _OwnClientApp())
        assert status == "failed" and not interrupted  # only this task ended; nothing signalled the process

        class Client:
            def __init__(self, answer: int) -> None:
                self.answer = answer

            def SendTaskHeartbeat(self, _request: object) -> SendTaskHeartbeatResponse:
                if self.answer != 200:
                    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/send-task-heartbeat")
                    httpx.Response(self.answer, request=request).raise_for_status()
                return SendTaskHeartbeatResponse(success=False)

        for answer, is_dropped in ((200, True), (401, True), (500, False)):  # a server error is retried, the task kept
            dropped = threading.Event()
            assert _task_heartbeat_fn(Client(answer), dropped)() is is_dropped
            assert dropped.is_set() is is_dropped and not interrupted
    finally:
        server.shutdown()
        server.server_close()
        signal.signal(signal.SIGINT, previous)


def test_short_heartbeats_reach_the_supernode_and_the_superlink_accepts_them() -> None:
    """The pinned Flower's SuperNode announces and keeps fedmm's interval; its SuperLink accepts it (Flower: >= 10 s)."""
    import subprocess
    import sys

    code = (
        "from fedmm.runtime.flower_waits import short_heartbeats, accept_short_heartbeats\n"
        "assert short_heartbeats(3.0) and accept_short_heartbeats()\n"
        "from flwr.supercore import heartbeat\nfrom flwr.supernode import fleet_http_connection, fleet_http_client\n"
        "from flwr.superlink.servicer.fleet import fleet_handlers\n"
        "assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 3.0 and fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 3.0\n"
        "wait = (heartbeat.HEARTBEAT_DEFAULT_INTERVAL - heartbeat.HEARTBEAT_CALL_TIMEOUT) * heartbeat.HEARTBEAT_BASE_MULTIPLIER\n"
        "assert 1.0 < wait < 3.0, wait  # a heartbeat every ~1.6 s: never a busy loop, never two intervals missed\n"
        "assert fleet_http_client.HEARTBEAT_CALL_TIMEOUT == 1.0\n"
        "fleet_handlers._validate_heartbeat_interval(3.0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from fedmm.runtime.flower_waits import short_heartbeats

    with pytest.raises(ValueError, match="between 1 and 30"):
        short_heartbeats(0.2)


def test_a_site_file_sets_the_supernodes_heartbeat(tmp_path: Path) -> None:
    from fedmm.runtime.deploy import SiteSettings

    assert SiteSettings.load(_site_file(tmp_path)).heartbeat_interval == 3.0
    assert SiteSettings.load(_site_file(tmp_path, "heartbeat-interval = 5\n")).heartbeat_interval == 5.0


def test_a_sites_executor_runs_its_own_clientapp_never_the_servers_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit finding: the executor installed and ran whatever app bundle (FAB) the server submitted: a server could
    ship a ClientApp that trains without DP or skips the site's ledger."""
    import types

    import flwr.cli.install

    from fedmm.runtime.executor import _OwnClientApp
    from fedmm.site.clientapp import app as own_app

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the server's bundle was installed")

    monkeypatch.setattr(flwr.cli.install, "install_from_fab", refuse)
    apps = _OwnClientApp()
    run = types.SimpleNamespace(run_id=1, fab_id="evil/app", fab_version="6.6.6")
    for content in (b"a bundle whose clients/app.py skips the ledger", b"another"):
        fab = types.SimpleNamespace(hash_str=content.hex()[:64], content=content)
        assert apps.get(run, fab) is own_app


def test_a_server_with_a_broken_certificate_and_a_site_started_twice_are_refused_before_anything_starts(tmp_path: Path) -> None:
    """Operator findings: an expired server certificate started a half-alive SuperLink; a second `fedmm site` for the
    same site died on Flower's 'address already in use' traceback."""
    import datetime as dt
    import socket

    from fedmm.errors import ConfigError
    from fedmm.runtime import deploy
    from fedmm.secure import certs

    pki = tmp_path / "pki"
    certs.init_certificates(pki)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=5000)
    real_problems = certs.problems
    import unittest.mock

    with unittest.mock.patch.object(certs, "problems", lambda outdir: real_problems(outdir, now=later)):
        with pytest.raises(ConfigError, match=r"cannot serve TLS: .*server.crt expired"):
            deploy.run_server(pki, tmp_path / "server-state", host="127.0.0.1", port=1)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        site = deploy.SiteSettings.load(_site_file(tmp_path, f"clientapp-port = {port}\n"))
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{port} is in use: is site george .* already running"):
            deploy.run_site(site)
