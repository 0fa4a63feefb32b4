"""A supervisor killed with SIGKILL leaves no child or grandchild running (fedmm.runtime.supervise)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedmm.runtime.loopback import descendants
from fedmm.runtime.supervise import GRACE

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux-only")

PROJECT = Path(__file__).resolve().parents[1]

# A supervisor as `fedmm site` runs one: two children through fedmm's helper, each with a grandchild
# (a shell that starts a `sleep` and waits for it); with "stubborn", one of them ignores SIGTERM.
SUPERVISOR = textwrap.dedent(
    """
    import sys
    from fedmm.runtime.supervise import spawn, supervise
    children = [("shell", spawn(["sh", "-c", "sleep 300 & wait"]))]
    if sys.argv[1:] == ["stubborn"]:  # a child that ignores SIGTERM, and so does its grandchild
        children.append(("stubborn", spawn(["sh", "-c", "trap '' TERM; sleep 301 & wait; wait"])))
    else:
        children.append(("second", spawn(["sh", "-c", "sleep 301 & wait"])))
    print("started", flush=True)
    raise SystemExit(supervise(children))
    """
)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_supervisor(*args: str) -> tuple[subprocess.Popen[str], list[int]]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, *args], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert supervisor.stdout is not None and supervisor.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # both `sleep`s up: the whole tree is there
        tree = descendants(supervisor.pid)
        if sum(Path(f"/proc/{p}/comm").read_text().strip() == "sleep" for p in tree if _alive(p)) == 2:
            return supervisor, tree
        time.sleep(0.1)
    supervisor.kill()
    raise AssertionError("the supervisor's children did not start")


def _cleanup(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_no_child_or_grandchild_outlives_its_supervisor(how: str) -> None:
    supervisor, tree = _start_supervisor(*(["stubborn"] if how == "SIGTERM" else []))
    try:
        assert len(tree) >= 4  # 2 shells, 2 sleeps (and, on Linux, their 2 guards)
        os.kill(supervisor.pid, getattr(signal, how))
        supervisor.wait(15)
        # SIGKILL: no cleanup ran in the supervisor; the guards' parent-death signal does it.
        # SIGTERM: the supervisor stops its children; the stubborn one is SIGKILLed after the grace period.
        deadline = time.monotonic() + (3 if how == "SIGKILL" else GRACE + 3)
        while time.monotonic() < deadline and any(map(_alive, tree)):
            time.sleep(0.1)
        survivors = [p for p in tree if _alive(p)]
        assert not survivors, f"left running after {how} of the supervisor: " + ", ".join(
            f"{p} {Path(f'/proc/{p}/cmdline').read_text().replace(chr(0), ' ')}" for p in survivors
        )
    finally:
        _cleanup([supervisor.pid, *tree])
