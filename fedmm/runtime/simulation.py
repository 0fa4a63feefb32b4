"""``fedmm simulate``: run the Flower App through Flower's own simulation engine.

Flower's simulation runs behind a SuperLink, driven with ``flwr run`` (the same
path as ``flwr run .``). This module owns the parts Flower leaves to the caller:

- a private SuperLink on a free loopback port, with runtime dependency
  installation off (it would otherwise ``uv sync`` a CUDA torch), its own
  ``FLWR_HOME`` and Ray temp folder, so nothing leaks into ``~/.flwr``;
- the run's real outcome: ``flwr run --stream`` exits 0 even when the run
  failed, so the status comes from ``flwr ls``;
- clean shutdown: every process it started is stopped by PID, including Ray
  helpers that ignore SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedmm.config import RunConfig
from fedmm.errors import FederationError
from fedmm.runtime.app_bundle import staged_app
from fedmm.runtime.ray_cluster import RaySettings

__all__ = ["SimulationOutcome", "find_app_dir", "run_simulation"]

CONNECTION = "fedmm-sim"
_STARTUP_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SimulationOutcome:
    """What a finished simulation left behind."""

    flower_run_id: str
    status: str
    details: str
    run_dir: Path
    log_file: Path

    @property
    def ok(self) -> bool:
        """True when Flower reports the run completed and the summary exists."""
        return self.status == "finished:completed" and (self.run_dir / "summary.json").is_file()


def find_app_dir() -> Path:
    """The folder holding fedmm's ``pyproject.toml`` (the Flower App)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "server" / "app.py").is_file():
        raise FederationError(
            f"cannot find the fedmm Flower App next to {root}: `fedmm simulate` runs from a checkout of the "
            "repository installed with `pip install -e .` (see README)"
        )
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(f"the SuperLink exited with code {process.returncode} at start; see {log_file}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(f"the SuperLink did not open port {port} within {_STARTUP_TIMEOUT_S:.0f} s; see {log_file}")


def _proc_stats() -> dict[int, list[str]]:
    """Each process's /proc stat fields after its name: [state, ppid, pgrp, ...]."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    return stats


def _children(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc)."""
    parents = {p: int(fields[1]) for p, fields in _proc_stats().items()}
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _process_groups(pids: list[int]) -> set[int]:
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return groups


def _stop(process: subprocess.Popen[Any]) -> None:
    """Stop the SuperLink and everything it started, by PID and process group."""
    descendants = _children(process.pid)
    groups = _process_groups([process.pid, *descendants]) - {os.getpgid(0)}
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Ray's agents ignore SIGTERM and outlive their parents, but stay in these groups.
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in descendants:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # A kill is only sent, not done: the ServerApp may hold the run folder's lock until it is gone, and a
    # caller told "stopped" may resume the run at once. Grandchildren cannot be waited for, so watch /proc.
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while _living(set(descendants), groups) and time.monotonic() < deadline:
        time.sleep(0.02)


def _living(pids: set[int], groups: set[int]) -> list[int]:
    """Those of ``pids``, or of any process in ``groups``, that have not exited (a zombie has: its files are closed)."""
    return [p for p, fields in _proc_stats().items() if fields[0] != "Z" and (p in pids or int(fields[2]) in groups)]


def _flwr(env: dict[str, str], *args: str) -> dict[str, object]:
    """Run a ``flwr`` CLI command that prints JSON and return the parsed object."""
    done = subprocess.run(
        [shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr", *args, "--format", "json"],
        env=env, capture_output=True, text=True, check=False,
    )
    try:
        return dict(json.loads(done.stdout))
    except json.JSONDecodeError as err:
        raise FederationError(f"`flwr {' '.join(args)}` printed no JSON (exit {done.returncode}): {done.stderr.strip()[-2000:]}") from err


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (the terminal or ssh session closed; not under ``nohup``) stop a run as Ctrl-C does (a
    ``KeyboardInterrupt`` in the main thread, then the run's record of what it left), not the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGHUP only where it is not ignored already: under nohup the run must outlive its terminal, as it asked
    caught = [signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else [])
    previous = {sig: signal.signal(sig, interrupt) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_simulation(cfg: RunConfig, *, on_line: Callable[[str], None], ray: RaySettings | None = None) -> SimulationOutcome:
    """Run ``cfg`` as a Flower simulation with ``cfg.sites`` virtual sites.

    ``on_line`` receives every line of the run's log as it streams. The run
    folder is ``cfg.runs_dir / cfg.run_name`` (``run_name`` must be set).
    ``ray``: a private Ray (default) or an existing cluster, and one site's resources.
    """
    if not cfg.run_name:
        raise FederationError("run_simulation needs cfg.run_name to know the run folder")
    app_dir = find_app_dir()
    ray = ray or RaySettings()
    ray.preflight(cfg, app_dir)  # an existing cluster: checked from each of its nodes first
    run_dir = Path(cfg.runs_dir).resolve() / cfg.run_name
    work = Path(tempfile.mkdtemp(prefix="fedmm-sim-"))
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the SuperLink starts flower-superexec by name
    env.update(
        FLWR_HOME=str(work / "flwr-home"), RAY_TMPDIR=str(work / "ray"),
        FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0",
    )
    ray.prepare_env(env, app_dir)
    (work / "flwr-home").mkdir()
    (work / "ray").mkdir()
    (work / "flwr-home" / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}})
    )
    overrides = work / "run-config.toml"
    overrides.write_text(tomli_w.dumps(cfg.replace(runs_dir=str(Path(cfg.runs_dir).resolve())).to_run_config()))
    superlink_log = work / "superlink.log"
    with open(superlink_log, "wb") as sl_out:
        superlink = subprocess.Popen(
            [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=work, env=env, stdout=sl_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    log_file = work / "flower.log"
    run_id, stream = "", None
    try:
        with sigterm_as_interrupt():
            _wait_for_port(port, superlink, superlink_log)
            started = _flwr(
                env, "run", str(staged_app(app_dir, work / "app")), CONNECTION, "--run-config", str(overrides),
                "--federation-config", ray.federation_config(cfg.sites),
            )
            if not started.get("success"):
                raise FederationError(f"Flower refused the run: {started.get('error-message', started)}")
            run_id = str(started["run-id"])
            with open(log_file, "w", encoding="utf-8") as log_out:
                stream = subprocess.Popen(
                    [str(bin_dir / "flwr"), "log", run_id, CONNECTION, "--stream"],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                )
                assert stream.stdout is not None  # set by stdout=PIPE
                for line in stream.stdout:
                    log_out.write(line)
                    on_line(line.rstrip("\n"))
                stream.wait()
            listing = _flwr(env, "ls", CONNECTION, "--run-id", run_id)
        runs = listing.get("runs") or [{}]
        info = dict(runs[0])  # type: ignore[index]
        status, details = str(info.get("status", "unknown")), str(info.get("status-details", ""))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the SuperLink and its apps are stopped below; each spend was committed before its update left
        status, details = "finished:interrupted", "interrupted (Ctrl-C, SIGTERM or SIGHUP)"
        with open(log_file, "a", encoding="utf-8") as log_out:
            log_out.write(f"run {details}\n")
    finally:
        if stream is not None and stream.poll() is None:
            _stop(stream)
        _stop(superlink)
    kept_log = run_dir / "flower.log" if run_dir.is_dir() else Path(cfg.runs_dir).resolve() / f"{cfg.run_name}.flower.log"
    kept_log.parent.mkdir(parents=True, exist_ok=True)
    if log_file.is_file():
        shutil.copyfile(log_file, kept_log)
    shutil.rmtree(work, ignore_errors=True)
    return SimulationOutcome(run_id, status, details, run_dir, kept_log)
