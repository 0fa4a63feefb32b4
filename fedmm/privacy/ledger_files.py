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

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedmm.errors import PrivacyError
from fedmm.holder_lock import Held, HolderLock, who

__all__ = ["LedgerLock", "write_anchor", "read_anchor", "append_log", "read_log"]


class LedgerLock(HolderLock):
    """One process per ledger: an exclusive, non-blocking ``flock`` on ``<ledger>.lock``
    (:class:`fedmm.holder_lock.HolderLock`), waited for up to ``wait`` seconds."""

    def __init__(self, ledger: Path, *, wait: float = 10.0) -> None:
        try:
            super().__init__(ledger.with_name(ledger.name + ".lock"), wait=wait)
        except Held as held:
            raise PrivacyError(
                f"the privacy ledger {ledger} is in use by another process ({held.holder}) and stayed so for {wait:g} s; "
                "only one process may check a site's budget and record its spends. Fix: stop the other fedmm site "
                "(or simulation) that uses this state directory, or give each its own"
            ) from None


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
    line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": event, **fields, **who()})
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
