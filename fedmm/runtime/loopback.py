"""A whole deployment on one machine's loopback: ``fedmm server``, sites, ``flwr`` (tests, benchmarks).

Every process runs in its own session with its own HOME and FLWR_HOME under ``root``;
:meth:`LoopbackDeployment.kill` takes a component down with everything it started, and
:meth:`LoopbackDeployment.stop_all` stops what is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from fedmm.runtime.app_bundle import staged_app

__all__ = ["LoopbackDeployment", "free_port"]

BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[2]


CLI_POLL = 1.5  # seconds between checks that start a `flwr` process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackDeployment:
    """Processes of one loopback deployment, each in its own session, all stopped at the end."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, *, server_options: tuple[str, ...] = ()) -> None:
        self.root = root
        self.server_options = server_options
        self.env = dict(os.environ, **(env or {}), HOME=str(root / "home"), FLWR_HOME=str(root / "flwr"), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", COLUMNS="200")
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env['PATH']}"
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        (root / "home").mkdir(parents=True)

    def fedmm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "fedmm"), *args], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (kept open by the child)
        self.processes[name] = subprocess.Popen([str(BIN / "fedmm"), *args], cwd=self.root, env=self.env, stdout=log, stderr=log, start_new_session=True)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a component and everything it started (each child runs in its own session)."""
        self._reap([self._signal(name, sig)])

    def _signal(self, name: str, sig: int) -> tuple[subprocess.Popen[bytes], list[int]]:
        process = self.processes.pop(name)
        victims = [process.pid, *descendants(process.pid)]
        for pid in victims:
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return process, victims

    @staticmethod
    def _reap(signalled: list[tuple[subprocess.Popen[bytes], list[int]]]) -> None:
        """Wait for signalled components, then SIGKILL whatever of theirs is left."""
        for process, _ in signalled:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        for _, victims in signalled:
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    @property
    def server_args(self) -> tuple[str, ...]:
        return ("server", "--pki", str(self.root / "pki"), "--state-dir", str(self.root / "server"), "--host", "127.0.0.1", "--port", str(self.port), *self.server_options)

    def start_federation(self, sites: tuple[str, ...], *, site_lines: str = "", site_file: Callable[[str], str] | None = None) -> None:
        """Certificates, the server, each site's key registered (with its name), each site started; wait until all are online.

        ``site_file(name)`` gives a site's whole TOML file (e.g. the deploy guide's template); by default
        a minimal one with a budget of 100 plus ``site_lines``.
        """
        from fedmm.privacy.ledger import PrivacyLedger
        from fedmm.runtime.deploy import write_connection

        pki = self.root / "pki"
        for args in (("certs", "init", str(pki)), ("certs", "site", str(pki), *sites)):
            done = self.fedmm(*args)
            if done.returncode != 0:
                raise RuntimeError(done.stdout + done.stderr)
        write_connection(self.root / "flwr", "fedmm", f"127.0.0.1:{self.port}", pki / "ca.crt")
        self.start("server", *self.server_args)
        self.wait_for("the SuperLink", lambda: '"success": true' in self.flwr("supernode", "ls", "fedmm", "--format", "json").stdout, interval=CLI_POLL)
        for site in sites:
            registered = self.flwr("supernode", "register", str(pki / "sites" / f"{site}.pub"), "fedmm", "--name", site, "--format", "json")
            if '"success": true' not in registered.stdout:
                raise RuntimeError(registered.stdout + registered.stderr)
            # the site's ledger, made once as its operator would with `fedmm ledger init` (a site never makes one itself)
            PrivacyLedger.create(self.root / "state" / site / "ledger.sqlite", site=site, reason="loopback deployment").close()
            (self.root / f"{site}.toml").write_text(
                site_file(site) if site_file is not None else
                f'[site]\nname = "{site}"\nsuperlink = "127.0.0.1:{self.port}"\nca = "pki/ca.crt"\nkey = "pki/sites/{site}.key"\n'
                f'state-dir = "state/{site}"\nepsilon-budget = 100.0\nclientapp-port = {free_port()}\n{site_lines}'
            )
            self.start(site, "site", f"{site}.toml")
        self.wait_for(f"{len(sites)} sites online", lambda: self.online() == len(sites), interval=CLI_POLL)

    def stop_all(self) -> None:
        """SIGTERM every component at once (they shut down side by side), then reap them."""
        self._reap([self._signal(name, signal.SIGTERM) for name in list(self.processes)])

    def wait_for(self, what: str, check: Callable[[], object], timeout: float = 180, *, interval: float = 0.3) -> None:
        """Poll ``check`` until true. A check that runs the ``flwr`` CLI should use ``interval=CLI_POLL``:
        each call is a new Python process, and polling it back to back takes a core from the federation."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            ended = [name for name, process in self.processes.items() if process.poll() is not None]
            if ended:
                raise AssertionError(f"{', '.join(ended)} ended while waiting for {what}\n{self.logs()}")
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def server_log(self, run_id: str) -> str:
        """The ServerApp's log of one run, as the SuperLink stored it (empty if the database has none)."""
        db = self.root / "server" / "superlink.db"
        if not db.exists():
            return ""
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as con:
            try:
                rows = con.execute(
                    "SELECT l.log FROM task_logs l JOIN task t ON t.task_id = l.task_id WHERE t.run_id = ? ORDER BY l.timestamp", (_signed(int(run_id)),)
                ).fetchall()
            except sqlite3.Error as e:
                return f"(cannot read the ServerApp log from {db}: {e})"
        return "".join(str(r[0]) for r in rows)

    def online(self) -> int:
        done = self.flwr("supernode", "ls", "fedmm", "--format", "json")
        try:
            return sum(n["status"] == "online" for n in json.loads(done.stdout).get("nodes", []))
        except json.JSONDecodeError:
            return 0

    def run_status(self, run_id: str) -> str:
        done = self.flwr("ls", "fedmm", "--run-id", run_id, "--format", "json")
        try:
            runs = json.loads(done.stdout).get("runs", [])
        except json.JSONDecodeError:
            return ""
        return str(runs[0].get("status", "")) if runs else ""

    def submit(self, run_config: str) -> str:
        # the checkout's bundle files on their own: the same FAB as `flwr run .` builds, without walking .venv (fedmm.runtime.app_bundle)
        app = staged_app(PROJECT, self.root / "app")
        done = self.flwr("run", str(app), "fedmm", "--run-config", run_config, "--format", "json", timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return str(json.loads(done.stdout)["run-id"])


def _signed(run_id: int) -> int:
    """Flower stores its unsigned 64-bit run ids as SQLite's signed integers."""
    return run_id - (1 << 64) if run_id >= 1 << 63 else run_id


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


