"""The files around a site's ledger: its lock, its head anchor and its log (no SQLite here).

- ``ledger.sqlite.lock``: an exclusive ``flock`` held by the one process that may check the
  budget and append (from the check through the append); the file names the holder;
- ``ledger.sqlite.head``: the newest entry's sequence number and hash, written after each
  commit (fsync, then rename);
- ``ledger.sqlite.log``: one JSON line per lifecycle event (created, replaced after a loss,
  anchor repaired, spends recovered), with who, where and why. The log and the anchor are the evidence that a
  ledger existed: a site that finds them without its ledger refuses to start a new one;
- ``ledger.sqlite.spends``: every spend, whole, as JSON lines (``fedmm.privacy.ledger_spends``).
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

from fedmm.errors import PrivacyError

__all__ = ["LedgerLock", "write_anchor", "read_anchor", "append_log", "read_log"]


def _who() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:300]}


class LedgerLock:
    """One process per ledger: an exclusive, non-blocking ``flock`` on ``<ledger>.lock``.

    The operating system releases it when the holder exits, however it exits (SIGKILL too).
    """

    def __init__(self, ledger: Path, *, wait: float = 10.0) -> None:
        self.path = ledger.with_name(ledger.name + ".lock")
        self._handle: IO[str] | None = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115  held until release()
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder()
                    self.release()
                    raise PrivacyError(
                        f"the privacy ledger {ledger} is in use by another process ({holder}) and stayed so for {wait:g} s; "
                        "only one process may check a site's budget and record its spends. Fix: stop the other fedmm site "
                        "(or simulation) that uses this state directory, or give each its own"
                    ) from None
                time.sleep(0.05)
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps({**_who(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        self._handle.flush()

    def _holder(self) -> str:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            return f"pid {data['pid']}, since {data['since']}; its host, user and command are in {self.path.name}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that did not say who it is"

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None


def write_anchor(path: Path, seq: int, digest: str) -> None:
    """Write the head anchor atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"seq": seq, "hash": digest}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_anchor(path: Path) -> tuple[int, str] | None:
    """The anchor's ``(seq, hash)``; None when there is none; an unreadable one reads as a break."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data["seq"]), str(data["hash"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        return (10**9, "unreadable")  # reported as a break, never ignored


def append_log(path: Path, event: str, **fields: Any) -> None:
    """Append one lifecycle event to the ledger's log, durably."""
    line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": event, **fields, **_who()})
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell():  # a line torn by a crash (no newline) must not swallow this one
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
            handle.seek(0, os.SEEK_END)
            if torn:
                line = "\n" + line
        handle.write((line + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's events (unreadable lines are returned as ``{"event": "unreadable", "line": ...}``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(dict(json.loads(line)))
        except (ValueError, TypeError):
            events.append({"event": "unreadable", "line": line[:200]})
    return events
