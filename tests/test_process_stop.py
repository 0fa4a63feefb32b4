"""Stopping the private SuperLink stops everything it started before it returns."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fedmm.runtime.simulation import _stop

# A grandchild (as the ServerApp is the SuperLink's) that holds a lock, as the ServerApp holds its run
# folder's, and a large memory: the kernel frees a killed process's memory before it closes its files.
GRANDCHILD = textwrap.dedent("""
    import fcntl, sys, time
    handle = open(sys.argv[1], "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    ballast = bytearray(b"x") * (1536 << 20)
    open(sys.argv[2], "w").close()
    time.sleep(600)
""")
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
    time.sleep(600)
""")


def test_a_killed_grandchilds_lock_is_free_when_stop_returns(tmp_path: Path) -> None:
    # Before: the SIGKILLs were sent and _stop returned; the ServerApp could still hold runs/<run>/run.lock,
    # so `fedmm simulate --superlink` said "interrupted, resume it" while a resume was refused (CI, 2 Dec).
    lock, ready = tmp_path / "run.lock", tmp_path / "ready"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, GRANDCHILD, str(lock), str(ready)], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        _stop(parent)
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while the grandchild lives
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
