"""A site's privacy ledger: every DP spend, append-only, hash-chained, in SQLite.

One file a site (``<state-dir>/ledger.sqlite``), written only by that site. An entry
is one round's DP-SGD spend: the mechanism's parameters (noise multiplier, Poisson
sample rate, steps), the delta and accountant the epsilon is stated with, and the
site's cumulative epsilon over *all* its entries, across runs, after this one. The
site appends the entry, durably (SQLite WAL, ``synchronous=FULL``), before its
update leaves; a crash at any point leaves the ledger at or ahead of what was sent.

Each entry's hash covers its fields and the previous entry's hash, so an edited,
removed or reordered entry breaks the chain. Removing the newest entries leaves a
valid shorter chain; the site also keeps the head (sequence number and hash) in
``ledger.sqlite.head``, written after each commit, and reports it with every update
(the server keeps it in ``privacy.json``), so a truncated ledger contradicts both.
Someone who can rewrite the file and its anchor can forge both; the chain makes an
accident or a careless edit evident, not a determined owner honest.

>>> import tempfile, pathlib
>>> ledger = PrivacyLedger(pathlib.Path(tempfile.mkdtemp()) / "ledger.sqlite", site="george")
>>> entry = ledger.append(run_id="r1", round=1, noise_multiplier=1.0, sample_rate=0.25, steps=4,
...                       delta=1e-5, accountant="rdp", epsilon=1.9, epsilon_budget=8.0, data="d")
>>> entry.seq, ledger.verify().ok
(1, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fedmm.errors import PrivacyError
from fedmm.privacy.accounting import PrivacyEvent

__all__ = ["LedgerEntry", "ChainVerdict", "PrivacyLedger", "MECHANISM", "find_ledgers"]

MECHANISM = "dp-sgd: poisson-subsampled gaussian"
GENESIS = "0" * 64
SCHEMA_VERSION = 1

_COLUMNS = (
    "seq", "site", "run_id", "round", "mechanism", "noise_multiplier", "sample_rate", "steps",
    "delta", "accountant", "epsilon", "epsilon_budget", "data", "created", "prev_hash", "hash",
)
_CREATE = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    site TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    epsilon REAL NOT NULL,
    epsilon_budget REAL NOT NULL,
    data TEXT NOT NULL,
    created TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class LedgerEntry:
    """One spend, as stored."""

    seq: int
    site: str
    run_id: str
    round: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    epsilon: float  # cumulative over this site's entries up to this one, at ``delta``
    epsilon_budget: float  # the site's budget when it made this spend
    data: str  # digest of the training data the spend was on
    created: str  # UTC, ISO 8601
    prev_hash: str
    hash: str

    @property
    def event(self) -> PrivacyEvent:
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps)

    def expected_hash(self) -> str:
        """The hash this entry must carry: its fields (but ``hash``) chained to ``prev_hash``."""
        fields = {k: v for k, v in asdict(self).items() if k != "hash"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, allow_nan=False).encode()).hexdigest()


@dataclass(frozen=True)
class ChainVerdict:
    """Whether a ledger's chain holds, and what is wrong where it does not."""

    ok: bool
    entries: int
    problems: tuple[str, ...] = field(default=())


class PrivacyLedger:
    """A site's ledger file; created on first use. Entries are only ever appended."""

    def __init__(self, path: str | Path, *, site: str | None = None, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise PrivacyError(f"no privacy ledger at {self.path}. Fix: give the path of a site's ledger.sqlite (or its state directory)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PrivacyError(
                f"cannot create the privacy ledger's folder {self.path.parent} ({err}); the site does not train without its ledger. "
                "Fix: point the site's state directory at a writable folder"
            ) from err
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before append() returns
            self._db.executescript(_CREATE)
            stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            raise PrivacyError(f"{self.path} is not a readable privacy ledger ({err}). Fix: restore it from a backup; never delete a ledger") from err
        if "site" not in stored and site is not None:
            self._db.execute("INSERT INTO meta VALUES ('site', ?), ('schema', ?)", (site, str(SCHEMA_VERSION)))
            stored = {"site": site}
        if site is not None and stored.get("site") != site:
            raise PrivacyError(f"ledger {self.path} belongs to site {stored.get('site')!r}, not {site!r}. Fix: give each site its own state directory")
        self.site = stored.get("site", "")

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self) -> list[LedgerEntry]:
        """Every entry, in sequence order."""
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries ORDER BY seq").fetchall()
        return [LedgerEntry(*row) for row in rows]

    def events(self, run_id: str | None = None) -> list[PrivacyEvent]:
        """The DP events of every entry (or of one run's), oldest first."""
        return [e.event for e in self.entries() if run_id is None or e.run_id == run_id]

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest entry; ``(0, GENESIS)`` when empty."""
        row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))

    def append(
        self, *, run_id: str, round: int, noise_multiplier: float, sample_rate: float, steps: int,
        delta: float, accountant: str, epsilon: float, epsilon_budget: float, data: str,
    ) -> LedgerEntry:
        """Append one spend and return it once it is durably on disk (then update the head anchor)."""
        PrivacyEvent(noise_multiplier, sample_rate, steps)  # range checks
        self._db.execute("BEGIN IMMEDIATE")  # one writer; the head read below cannot go stale
        try:
            seq, prev = self.head()
            last = self._db.execute("SELECT epsilon FROM entries WHERE seq = ?", (seq,)).fetchone()
            if last is not None and epsilon < float(last[0]):
                raise PrivacyError(f"ledger {self.path}: cumulative epsilon would fall from {last[0]} to {epsilon}; refused")
            created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
            draft = LedgerEntry(
                seq + 1, self.site, run_id, int(round), MECHANISM, float(noise_multiplier), float(sample_rate), int(steps),
                float(delta), str(accountant), float(epsilon), float(epsilon_budget), data, created, prev, "",
            )
            entry = LedgerEntry(**{**asdict(draft), "hash": draft.expected_hash()})
            self._db.execute(f"INSERT INTO entries VALUES ({', '.join('?' * len(_COLUMNS))})", tuple(asdict(entry).values()))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        _write_anchor(self.head_path, entry.seq, entry.hash)
        return entry

    def verify(self) -> ChainVerdict:
        """Check the hash chain, the sequence, monotone epsilon and the head anchor."""
        entries = self.entries()
        problems: list[str] = []
        prev, last_epsilon = GENESIS, 0.0
        for position, entry in enumerate(entries, start=1):
            if entry.seq != position:
                problems.append(f"entry {entry.seq} is at position {position}: an entry was removed before it")
            if entry.prev_hash != prev:
                problems.append(f"entry {entry.seq}: its previous-hash does not match entry {position - 1}'s hash (removed or reordered entries)")
            if entry.hash != entry.expected_hash():
                problems.append(f"entry {entry.seq} (run {entry.run_id}, round {entry.round}): content does not match its hash (edited)")
            if entry.epsilon < last_epsilon:
                problems.append(f"entry {entry.seq}: cumulative epsilon falls from {last_epsilon} to {entry.epsilon}")
            prev, last_epsilon = entry.hash, entry.epsilon
        # The anchor is written just after each commit, so a crash in between leaves it one
        # entry behind; anything else means the ledger or the anchor was changed by hand.
        seq, digest = _read_anchor(self.head_path) or (0, GENESIS)
        stored = {e.seq: e.hash for e in entries}
        if seq > len(entries):
            problems.append(f"the head anchor names entry {seq} ({digest[:12]}), but the ledger ends at entry {len(entries)}: newest entries removed")
        elif seq > 0 and stored.get(seq) != digest:
            problems.append(f"the head anchor's hash for entry {seq} differs from the ledger's: entries rewritten")
        elif len(entries) - seq > 1:
            problems.append(f"the head anchor ({self.head_path.name}) is at entry {seq}, the ledger at {len(entries)}: the anchor was replaced or removed")
        return ChainVerdict(not problems, len(entries), tuple(problems))


def _write_anchor(path: Path, seq: int, digest: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"seq": seq, "hash": digest}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_anchor(path: Path) -> tuple[int, str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data["seq"]), str(data["hash"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return (10**9, "unreadable")  # an unreadable anchor is reported as a break, never ignored


def find_ledgers(paths: Iterable[str | Path]) -> list[Path]:
    """Ledger files named directly, or found under directories (``**/ledger.sqlite``)."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(item.rglob("ledger.sqlite"))
        else:
            found.append(item)
    return found
