"""A site's privacy ledger: every DP spend, append-only, hash-chained, in SQLite.

One file a site (``<state-dir>/ledger.sqlite``), written only by that site. An entry
is one round's DP-SGD spend (or a site's noisy sensor statistics: sample rate 1, one step):
the mechanism and its parameters (noise multiplier, Poisson sample rate, steps), the delta and accountant the epsilon is stated with, and the
site's cumulative epsilon over *all* its entries, across runs, after this one. The
site appends the entry, durably (SQLite WAL, ``synchronous=FULL``), before its
update leaves; a crash at any point leaves the ledger at or ahead of what was sent.

The ledger is the authority, so its absence is an error, never a fresh start:

- :meth:`PrivacyLedger.create` makes a first ledger, only where no ledger has been
  (``fedmm ledger init``, or a simulation's fresh per-run folder); it logs who made it
  and why in ``ledger.sqlite.log``. A ledger lost for good is replaced only by an explicit
  ``--replace-lost`` that carries the lost spend over (:attr:`PrivacyLedger.carried`);
- :meth:`PrivacyLedger.open` is the site's: it refuses a missing ledger when the anchor
  or the log shows one existed, and holds an exclusive lock (one process per ledger)
  from the budget check through the append;
- :meth:`PrivacyLedger.read` is the auditor's: read-only (SQLite ``mode=ro``), and it
  refuses a file that is not a fedmm ledger instead of making one of it.

Each entry's hash covers its fields and the previous entry's hash, so an edited,
removed or reordered entry breaks the chain. The site also keeps the head (sequence
number and hash) in ``ledger.sqlite.head`` and reports it with every update (the server
keeps it in ``privacy.json``, a witness ``fedmm audit --witness`` checks). The data
digest in each entry is keyed (HMAC) with a secret kept in the ledger, so the head the
server sees tells it nothing about the data. Someone who can rewrite the file and its
anchor can forge both; only a witness held elsewhere catches that.

>>> import tempfile, pathlib
>>> ledger = PrivacyLedger.create(pathlib.Path(tempfile.mkdtemp()) / "ledger.sqlite", site="george")
>>> entry = ledger.append(run_id="r1", round=1, noise_multiplier=1.0, sample_rate=0.25, steps=4,
...                       delta=1e-5, accountant="rdp", epsilon=1.9, epsilon_budget=8.0, data="d")
>>> entry.seq, ledger.verify().ok
(1, True)
>>> ledger.close()
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fedmm.errors import PrivacyError
from fedmm.privacy.accounting import PrivacyEvent
from fedmm.privacy.ledger_files import LedgerLock, append_log, read_anchor, read_log, write_anchor

__all__ = ["LedgerEntry", "ChainVerdict", "CarriedSpend", "PrivacyLedger", "MECHANISM", "SITE_STATS_MECHANISM", "find_ledgers"]

MECHANISM = "dp-sgd: poisson-subsampled gaussian"
SITE_STATS_MECHANISM = "site statistics: gaussian, sample rate 1"  # sensor-norm=site under DP, once a run
GENESIS = "0" * 64
SCHEMA_VERSION = 1

_COLUMNS = (
    "seq", "site", "run_id", "round", "mechanism", "noise_multiplier", "sample_rate", "steps",
    "delta", "accountant", "epsilon", "epsilon_budget", "data", "created", "prev_hash", "hash",
)
_TYPES = {"seq": int, "round": int, "steps": int, "noise_multiplier": float, "sample_rate": float, "delta": float, "epsilon": float, "epsilon_budget": float}
_CREATE = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY, site TEXT NOT NULL, run_id TEXT NOT NULL, round INTEGER NOT NULL,
    mechanism TEXT NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL, epsilon REAL NOT NULL,
    epsilon_budget REAL NOT NULL, data TEXT NOT NULL, created TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
"""
_INIT = "fedmm ledger init {dir} --site {site}"


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
    data: str  # keyed digest of the training data the spend was on
    created: str  # UTC, ISO 8601
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> LedgerEntry:
        """An entry from a stored row, each field checked for its type (a text epsilon is a break, not a crash)."""
        values = dict(zip(_COLUMNS, row))
        for name, value in values.items():
            kind = _TYPES.get(name, str)
            ok = isinstance(value, int) and not isinstance(value, bool) if kind is int else (
                isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, str))
            if not ok:
                raise PrivacyError(f"ledger entry {values.get('seq')!r}: field {name} holds {value!r}, not {'a number' if kind is not str else 'text'}")
        return cls(**{k: (float(v) if _TYPES.get(k) is float else v) for k, v in values.items()})  # type: ignore[arg-type]

    @property
    def event(self) -> PrivacyEvent:
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps)

    def expected_hash(self) -> str:
        """The hash this entry must carry: its fields (but ``hash``) chained to ``prev_hash``."""
        content = {k: v for k, v in asdict(self).items() if k != "hash"}
        return hashlib.sha256(json.dumps(content, sort_keys=True, allow_nan=False).encode()).hexdigest()


@dataclass(frozen=True)
class ChainVerdict:
    """Whether a ledger's chain holds, what is wrong where it does not, and what was tolerated."""

    ok: bool
    entries: int
    problems: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())  # tolerances used (an anchor one entry behind), to be stated


@dataclass(frozen=True)
class CarriedSpend:
    """The spend of a ledger lost for good, carried into its replacement (basic composition)."""

    epsilon: float
    delta: float
    reason: str


class PrivacyLedger:
    """A site's ledger file; use :meth:`create`, :meth:`open` or :meth:`read`. Entries are only ever appended."""

    def __init__(self, path: Path, db: sqlite3.Connection, *, lock: LedgerLock | None, writable: bool) -> None:
        self.path, self._db, self._lock, self.writable = path, db, lock, writable
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            self.close()
            raise PrivacyError(f"{path} is not a readable privacy ledger ({err}). Fix: restore it from a backup; never delete a ledger") from err
        self.site = str(meta.get("site", ""))
        self._meta = meta

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, *, site: str, reason: str = "a new site", carried: CarriedSpend | None = None) -> PrivacyLedger:
        """Make a site's first ledger (locked, writable), or the replacement of one lost for good.

        Raises
        ------
        PrivacyError
            When a ledger is there, or the anchor or the log show that one was, unless
            ``carried`` states the lost ledger's spend.
        """
        path = Path(path)
        if not site:
            raise PrivacyError("a ledger needs the site's name. Fix: give --site NAME")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PrivacyError(f"cannot create the privacy ledger's folder {path.parent} ({err}). Fix: point the site's state directory at a writable folder") from err
        lock = LedgerLock(path, wait=2.0)  # making a ledger is one operator's act: another holder is not waited for long
        try:
            if path.exists():
                raise PrivacyError(f"a privacy ledger already exists at {path}; it is never replaced while it is there. Fix: keep using it")
            evidence = _evidence(path)
            if evidence and carried is None:
                raise PrivacyError(_lost_message(path, site, evidence))
            append_log(_log_path(path), "replaced-lost" if carried else "created", site=site, reason=reason,
                       **({"carried_epsilon": carried.epsilon, "carried_delta": carried.delta, "evidence": evidence} if carried else {}))
            db = _connect(path, readonly=False)
            db.executescript(_CREATE)
            meta = {"site": site, "schema": str(SCHEMA_VERSION), "data_key": secrets.token_hex(32), "created": _now()}
            if carried is not None:
                meta.update(carried_epsilon=repr(carried.epsilon), carried_delta=repr(carried.delta), carried_reason=carried.reason)
            db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
            write_anchor(_anchor_path(path), 0, GENESIS)
        except BaseException:
            lock.release()
            raise
        return cls(path, db, lock=lock, writable=True)

    @classmethod
    def open(cls, path: str | Path, *, site: str | None = None, create_if_new: bool = False, wait: float = 10.0) -> PrivacyLedger:
        """The site's ledger, locked for this process and writable.

        ``create_if_new`` (a simulation's fresh per-run folder) makes a first ledger where
        none has ever been; a ledger whose anchor or log remains is never remade.
        """
        path = Path(path)
        if not path.is_file():
            evidence = _evidence(path)
            if evidence:
                raise PrivacyError(_lost_message(path, site or "NAME", evidence))
            if create_if_new and site:
                return cls.create(path, site=site, reason="a simulation's fresh per-run folder")
            raise PrivacyError(
                f"no privacy ledger at {path}: a site trains under DP only with its ledger. "
                f"Fix: run `{_INIT.format(dir=path.parent, site=site or 'NAME')}` once, when the site is set up"
            )
        lock = LedgerLock(path, wait=wait)
        try:
            ledger = cls(path, _checked(path, readonly=False), lock=lock, writable=True)
        except BaseException:
            lock.release()
            raise
        if site is not None and ledger.site != site:
            ledger.close()
            raise PrivacyError(f"ledger {path} belongs to site {ledger.site!r}, not {site!r}. Fix: give each site its own state directory")
        verdict = ledger.verify()
        if not verdict.ok:  # never spend on top of a ledger that lost or changed entries: its budget check would be wrong
            ledger.close()
            raise PrivacyError(
                f"the privacy ledger {path} does not verify ({'; '.join(verdict.problems[:3])}); the site refuses to train on it. "
                "Fix: restore the ledger and its .head anchor from a backup (fedmm audit shows what is wrong)"
            )
        ledger._prepare_for_writing()
        return ledger

    @classmethod
    def read(cls, path: str | Path) -> PrivacyLedger:
        """A ledger opened read-only for an audit: nothing is written, another schema is refused."""
        path = Path(path)
        if not path.is_file():
            raise PrivacyError(f"no privacy ledger at {path}. Fix: give the path of a site's ledger.sqlite (or its state directory)")
        return cls(path, _checked(path, readonly=True), lock=None, writable=False)

    def _prepare_for_writing(self) -> None:
        if "data_key" not in self._meta:  # ledgers of fedmm 0.1 had none
            self._meta["data_key"] = secrets.token_hex(32)
            self._db.execute("INSERT INTO meta VALUES ('data_key', ?)", (self._meta["data_key"],))
        seq, digest = self.head()
        anchor = read_anchor(self.head_path)
        if anchor is not None and anchor[0] == seq - 1 and self.verify(check_anchor=False).ok:
            # A crash between a commit and its anchor: the chain is intact, so bring the anchor up and say so.
            write_anchor(self.head_path, seq, digest)
            append_log(_log_path(self.path), "anchor-repaired", site=self.site, reason=f"the anchor was at entry {anchor[0]}, the ledger at {seq}")

    # ------------------------------------------------------------------ reading
    @property
    def head_path(self) -> Path:
        return _anchor_path(self.path)

    @property
    def data_key(self) -> bytes:
        """The site's secret key for data digests (never leaves the site)."""
        return bytes.fromhex(self._meta["data_key"])

    @property
    def carried(self) -> CarriedSpend | None:
        """The spend carried over from a ledger lost for good, or None."""
        if "carried_epsilon" not in self._meta:
            return None
        return CarriedSpend(float(self._meta["carried_epsilon"]), float(self._meta["carried_delta"]), self._meta.get("carried_reason", ""))

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self) -> list[LedgerEntry]:
        """Every entry, in sequence order (a field of the wrong type raises PrivacyError)."""
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries ORDER BY seq").fetchall()
        return [LedgerEntry.from_row(row) for row in rows]

    def events(self, run_id: str | None = None) -> list[PrivacyEvent]:
        """The DP events of every entry (or of one run's), oldest first."""
        return [e.event for e in self.entries() if run_id is None or e.run_id == run_id]

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest entry; ``(0, GENESIS)`` when empty."""
        row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))

    # ------------------------------------------------------------------ writing
    def append(
        self, *, run_id: str, round: int, noise_multiplier: float, sample_rate: float, steps: int,
        delta: float, accountant: str, epsilon: float, epsilon_budget: float, data: str, mechanism: str = MECHANISM,
    ) -> LedgerEntry:
        """Append one spend and return it once it is durably on disk (then update the head anchor)."""
        if not self.writable or self._lock is None:
            raise PrivacyError(f"ledger {self.path} is open read-only (or closed); a spend is recorded only by the site holding its lock")
        PrivacyEvent(noise_multiplier, sample_rate, steps)  # range checks
        carried = self.carried.epsilon if self.carried else 0.0
        if carried + epsilon > epsilon_budget * (1 + 1e-9):
            raise PrivacyError(f"ledger {self.path}: a spend to epsilon {carried + epsilon:.6g} is over the site's budget {epsilon_budget:g}; refused")
        self._db.execute("BEGIN IMMEDIATE")  # one writer; the head read below cannot go stale
        try:
            seq, prev = self.head()
            last = self._db.execute("SELECT epsilon FROM entries WHERE seq = ?", (seq,)).fetchone()
            if last is not None and epsilon < float(last[0]):
                raise PrivacyError(f"ledger {self.path}: cumulative epsilon would fall from {last[0]} to {epsilon}; refused")
            draft = LedgerEntry(
                seq + 1, self.site, run_id, int(round), str(mechanism), float(noise_multiplier), float(sample_rate), int(steps),
                float(delta), str(accountant), float(epsilon), float(epsilon_budget), data, _now(), prev, "",
            )
            entry = LedgerEntry(**{**asdict(draft), "hash": draft.expected_hash()})
            self._db.execute(f"INSERT INTO entries VALUES ({', '.join('?' * len(_COLUMNS))})", tuple(asdict(entry).values()))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        write_anchor(self.head_path, entry.seq, entry.hash)
        return entry

    # ------------------------------------------------------------------ checking
    def verify(self, *, check_anchor: bool = True) -> ChainVerdict:
        """Check the hash chain, the sequence, monotone epsilon and the head anchor."""
        try:
            entries = self.entries()
        except PrivacyError as err:
            return ChainVerdict(False, 0, (str(err),))
        problems: list[str] = []
        notes: list[str] = []
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
        replaced = [e for e in read_log(_log_path(self.path)) if e.get("event") == "replaced-lost"]
        if replaced:  # the carried spend sits outside the chain: the log that recorded it must agree
            logged, carried = replaced[-1], self.carried
            if carried is None or carried.epsilon != logged.get("carried_epsilon") or carried.delta != logged.get("carried_delta"):
                problems.append(
                    f"the log records a lost ledger's spend carried over (epsilon {logged.get('carried_epsilon')}, delta "
                    f"{logged.get('carried_delta')}), the ledger holds {carried.epsilon if carried else 'none'}: the carried spend was changed or removed"
                )
        if check_anchor:
            seq, digest = read_anchor(self.head_path) or (-1, GENESIS)
            stored = {e.seq: e.hash for e in entries}
            if seq < 0:
                problems.append(f"the head anchor {self.head_path.name} is missing: it was removed (every ledger has one from its creation)")
            elif seq > len(entries):
                problems.append(f"the head anchor names entry {seq} ({digest[:12]}), but the ledger ends at entry {len(entries)}: newest entries removed")
            elif seq > 0 and stored.get(seq) != digest:
                problems.append(f"the head anchor's hash for entry {seq} differs from the ledger's: entries rewritten")
            elif len(entries) - seq > 1:
                problems.append(f"the head anchor ({self.head_path.name}) is at entry {seq}, the ledger at {len(entries)}: the anchor was replaced")
            elif len(entries) - seq == 1:
                notes.append(
                    f"tolerated: the head anchor is one entry behind the ledger (entry {seq} of {len(entries)}), as a crash between a "
                    "commit and the anchor leaves it; the same picture results if the newest entry was removed together with the "
                    "anchor, which only a witness (--witness privacy.json) can rule out"
                )
        return ChainVerdict(not problems, len(entries), tuple(problems), tuple(notes))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _anchor_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _log_path(path: Path) -> Path:
    return path.with_name(path.name + ".log")


def _evidence(path: Path) -> list[str]:
    """What shows that a ledger existed at ``path``: its anchor, its log, SQLite's side files."""
    companions = [_anchor_path(path), _log_path(path), path.with_name(path.name + "-wal")]
    return [p.name for p in companions if p.exists()]


def _lost_message(path: Path, site: str, evidence: list[str]) -> str:
    return (
        f"the privacy ledger {path} is missing, but {', '.join(evidence)} beside it show that site {site}'s ledger existed. "
        "The site refuses to start a new one: that would forget every epsilon it has spent. Fix: restore ledger.sqlite "
        "from a backup; if it is lost for good, run `fedmm ledger init "
        f"{path.parent} --site {site} --replace-lost --carried-epsilon E --carried-delta D --reason '...'` with the spend "
        "the site had made (the last privacy.json of the server, or the last audit of this ledger)"
    )


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    try:
        if readonly:
            # With no write-ahead log beside it, every committed spend is in the file: open it immutable, so
            # SQLite writes nothing at all (mode=ro alone still makes -shm and -wal files for a WAL database).
            # A log left by a running or crashed site holds committed spends: read it (SQLite then keeps its index).
            live_log = path.with_name(path.name + "-wal").exists()
            db = sqlite3.connect(f"{path.resolve().as_uri()}?{'mode=ro' if live_log else 'immutable=1'}", uri=True, isolation_level=None)
        else:
            db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before append() returns
    except sqlite3.DatabaseError as err:
        raise PrivacyError(f"{path} is not a readable privacy ledger ({err}). Fix: restore it from a backup; never delete a ledger") from err
    return db


def _checked(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open ``path`` and refuse anything that is not a fedmm ledger of a known schema."""
    db = _connect(path, readonly=readonly)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = tuple(row[1] for row in db.execute("PRAGMA table_info(entries)"))
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
    except sqlite3.DatabaseError as err:
        db.close()
        raise PrivacyError(f"{path} is not a readable privacy ledger ({err}). Fix: restore it from a backup; never delete a ledger") from err
    why = None
    if tables != {"meta", "entries"}:
        why = f"its tables are {sorted(tables) or 'none (an empty file)'}, a ledger has exactly meta and entries"
    elif columns != _COLUMNS:
        why = f"its entries table has the columns {list(columns)}"
    elif meta.get("schema") != str(SCHEMA_VERSION) or not meta.get("site"):
        why = f"its meta table names schema {meta.get('schema')!r} and site {meta.get('site')!r}"
    if why:
        db.close()
        raise PrivacyError(f"{path} is not a fedmm privacy ledger: {why}. Nothing was changed. Fix: give the ledger.sqlite of a site's state directory")
    return db


def find_ledgers(paths: Iterable[str | Path]) -> list[Path]:
    """Ledger files named directly, or found under directories (``**/ledger.sqlite``)."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(item.rglob("ledger.sqlite"))
        else:
            found.append(item)
    return found

