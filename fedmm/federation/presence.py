"""Which sites the server hears from, by name: online, lost (when and why), back again.

Flower's SuperLink knows each SuperNode by a number and whether its heartbeats still come;
an operator knows sites by name. :class:`Presence` joins the two for one run:

- every reply heard marks its node's site ``online`` with the time (``last_seen``);
- a reply that is Flower's "Node Unavailable" error (the SuperLink declared the node offline
  after its heartbeats stopped), or the node leaving the SuperLink's set of online nodes,
  marks it ``lost`` with the time and reason, and logs a warning that names the site;
- a lost node that is online again is logged as back and marked ``online``.

The state is kept in ``presence.json`` in the run folder (rewritten atomically on each
change), which ``fedmm status`` reads. A node is named by the server's account of its
reports (:mod:`fedmm.federation.identity`) or, in a deployment, by the enrolled key it
registered with (:func:`enrolled_names`); a node that has neither is ``node <id>``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

from flwr.common.logger import log

__all__ = ["DATABASE_ENV", "PRESENCE_FILE", "Presence", "SiteSeen", "enrolled_lookup", "enrolled_names", "site_names"]

PRESENCE_FILE = "presence.json"
DATABASE_ENV = "FEDMM_SUPERLINK_DATABASE"  # set by `fedmm server`: the SuperLink's database, for the nodes' registered keys
UNAVAILABLE = "Node Unavailable"  # Flower's error reply for a node whose heartbeats stopped


@dataclass
class SiteSeen:
    """One node as this run's server has seen it."""

    node: int
    state: str = "online"  # online | lost
    last_seen: float | None = None  # unix time of its last reply
    lost_at: float | None = None
    reason: str | None = None


class Presence:
    """The sites of one run as the server hears them (see the module docstring)."""

    def __init__(self, path: Path | None, names: Callable[[int], str | None]) -> None:
        self.path = path
        self.names = names
        self.nodes: dict[int, SiteSeen] = {}
        self._saved = 0.0
        self._dirty = False

    def name(self, node: int) -> str:
        return self.names(node) or f"node {node}"

    def heard(self, node: int, *, error: str | None = None) -> None:
        """A reply from ``node``; ``error`` is the reason of an error reply."""
        seen = self.nodes.setdefault(node, SiteSeen(node))
        if error is not None and UNAVAILABLE in error:
            self._lose(seen, "its heartbeats stopped (the SuperLink answered 'Node Unavailable' for it)")
            return
        now = time.time()
        back = seen.state == "lost"
        seen.state, seen.last_seen, seen.lost_at, seen.reason = "online", now, None, None
        if back:
            log(INFO, "[fedmm] site %s (node %d) is back: it replied", self.name(node), node)
        self.save(now=back)

    def online(self, nodes: Iterable[int]) -> None:
        """The SuperLink's current set of online nodes."""
        current = set(nodes)
        changed = False
        for node in current:
            seen = self.nodes.get(node)
            if seen is None:
                self.nodes[node] = SiteSeen(node)
                changed = True
            elif seen.state == "lost":
                seen.state, seen.lost_at, seen.reason = "online", None, None
                log(INFO, "[fedmm] site %s (node %d) is back online", self.name(node), node)
                changed = True
        for node, seen in self.nodes.items():
            if node not in current and seen.state != "lost":
                self._lose(seen, "it left the SuperLink's online nodes (no heartbeat)", save=False)
                changed = True
        if changed:
            self.save(now=True)

    def _lose(self, seen: SiteSeen, reason: str, *, save: bool = True) -> None:
        if seen.state == "lost":
            return
        seen.state, seen.lost_at, seen.reason = "lost", time.time(), reason
        last = "never replied in this run" if seen.last_seen is None else f"last reply {time.time() - seen.last_seen:.0f} s ago"
        log(WARNING, "[fedmm] site %s (node %d) LOST: %s; %s", self.name(seen.node), seen.node, reason, last)
        if save:
            self.save(now=True)

    def flush(self) -> None:
        """Write what :meth:`save` held back."""
        if self._dirty:
            self.save(now=True)

    def to_json(self) -> dict[str, object]:
        # a shallow copy of each record: dataclasses.asdict deep-copies, 0.25 s a write at 5,000 sites
        return {"updated": time.time(), "sites": {self.name(node): dict(vars(seen)) for node, seen in sorted(self.nodes.items())}}

    def save(self, *, now: bool = False) -> None:
        """Write ``presence.json``: at once for a change of state (``now``), otherwise at most once a
        second (every ``sites / 5,000`` seconds above 5,000 sites: each write covers every site)."""
        self._dirty = True
        if self.path is None or not (now or time.monotonic() - self._saved >= max(1.0, len(self.nodes) / 5000)):
            return
        self._saved, self._dirty = time.monotonic(), False
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            # one line: json's C encoder (an indent takes its pure-Python one, 10x slower), while the site
            # that trains waits for the interpreter
            tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError as err:  # presence is for the operator's eyes; never stop a round for it
            log(WARNING, "[fedmm] could not write %s: %s", self.path, err)


def enrolled_names(database: Path, keys: dict[str, object]) -> dict[int, str]:
    """Node id -> enrolled site name, from the SuperLink's database (the public key each node registered with).

    ``keys`` maps site names to their enrolled public keys (:class:`fedmm.secure.identity.EnrolledKeys`).
    An unreadable database or an unknown key gives no name (never an error: the names are for display).
    """
    from cryptography.hazmat.primitives import serialization

    wanted = {_numbers(key): name for name, key in keys.items()}
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2)) as con:
            rows = con.execute("SELECT node_id, public_key FROM node WHERE public_key IS NOT NULL").fetchall()
    except sqlite3.Error:
        return {}
    names: dict[int, str] = {}
    for node_id, pem in rows:
        try:
            key = serialization.load_pem_public_key(bytes(pem))
        except (ValueError, TypeError):
            continue
        name = wanted.get(_numbers(key))
        if name is not None and node_id is not None:
            names[int(node_id) + (1 << 64) if int(node_id) < 0 else int(node_id)] = name  # SQLite holds Flower's uint64 ids signed
    return names


def enrolled_lookup(keys: object | None) -> Callable[[int], str | None] | None:
    """A node's enrolled site name (the key it registered with), read from the SuperLink's database; None without
    a deployment's database and keys. A node not seen before has the table read again (at most every 5 s)."""
    database = os.environ.get(DATABASE_ENV)
    if database is None or keys is None:
        return None
    cache: dict[int, str] = {}
    looked = {"at": -1e9}

    def name(node: int) -> str | None:
        if node not in cache and time.monotonic() - looked["at"] > 5.0:
            looked["at"] = time.monotonic()
            cache.update(enrolled_names(Path(str(database)), getattr(keys, "keys", {})))
        return cache.get(node)

    return name


def site_names(strategy: object, keys: object | None) -> Callable[[int], str | None]:
    """A node's site name: from its reports in this run, else (a deployment) from the enrolled key it registered with."""
    enrolled = enrolled_lookup(keys)

    def name(node: int) -> str | None:
        accounts = getattr(strategy, "accounts", None)
        reported = accounts.site_of(node) if accounts is not None else None
        return reported if reported is not None or enrolled is None else enrolled(node)

    return name


def _numbers(key: object) -> object:
    try:
        return key.public_numbers()  # type: ignore[attr-defined]
    except AttributeError:
        return None
