"""One process at a time: an exclusive ``flock`` on a file that names its holder.

Used for a site's privacy ledger (``fedmm.privacy.ledger_files.LedgerLock``) and a run's folder
(``fedmm.federation.artifacts.RunArtifacts``). The operating system drops the lock when its holder
exits, however it exits (SIGKILL too), so a crashed holder never leaves it stuck. ``flock`` locks
belong to an open file: a second lock on the same file conflicts even within one process.
A lock file removed while held no longer excludes anyone (the next process makes a new one):
:meth:`HolderLock.still_held` tells a holder so before it acts on what the lock protects.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

__all__ = ["HolderLock", "Held", "holder_of", "who"]


def who() -> dict[str, Any]:
    """This process: user, host, pid and command line (cut to 300 characters)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:300]}


def holder_of(path: Path) -> str | None:
    """Who holds the lock on ``path`` now (as :meth:`HolderLock.holder` says it), or None when no
    process does. Only looks: takes no lock that lasts and writes nothing."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115  closed below
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while another holds it exclusively
        except BlockingIOError:
            return _holder(path)
    return None


def _holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        return f"pid {data['pid']}, since {data['since']}; its host, user and command are in {path.name}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not say who it is"


class Held(Exception):
    """The lock is held by another process (or another open of the file); ``holder`` says who."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class HolderLock:
    """An exclusive, non-blocking ``flock`` on ``path``, retried for up to ``wait`` seconds; raises
    :class:`Held` if it stays taken. While held, the file holds who holds it (JSON: :func:`who`
    and since when). :meth:`release` drops it."""

    def __init__(self, path: Path, *, wait: float = 0.0) -> None:
        self.path = path
        self._handle: IO[str] | None = None
        deadline = time.monotonic() + wait
        while True:
            self._handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115  held until release()
            try:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self.still_held():
                    break
                self.release()  # the file was removed or replaced between the open and the lock: lock the one there now
                continue
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.holder()
                    self.release()
                    raise Held(path, holder) from None
                self.release()
                time.sleep(0.05)
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps({**who(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        self._handle.flush()

    def holder(self) -> str:
        """Who the file says holds (or last held) the lock, in a few words."""
        return _holder(self.path)

    def still_held(self) -> bool:
        """Whether the file this lock holds is still the one at its path. A lock file removed (or
        replaced) while held leaves the lock on a file no one else opens: a second process then
        locks a new file of the same name, and both think they hold it."""
        if self._handle is None:
            return False
        try:
            held, there = os.fstat(self._handle.fileno()), os.stat(self.path)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None
