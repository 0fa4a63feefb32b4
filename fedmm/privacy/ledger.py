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
  or the log shows one existed, and one that lacks spends its spend log records (a ledger
  restored from an older backup: :meth:`PrivacyLedger.recover` adds them back), and holds an
  exclusive lock (one process per ledger) from the budget check through the append;
- :meth:`PrivacyLedger.read` is the auditor's: read-only (SQLite ``mode=ro``), and it
  refuses a file that is not a fedmm ledger instead of making one of it.

Each entry's hash covers its fields and the previous entry's hash, so an edited,
removed or reordered entry breaks the chain. The site also keeps the head (sequence
number and hash) in ``ledger.sqlite.head`` and reports it with every update (the server
keeps it in ``privacy.json``, a witness ``fedmm audit --witness`` checks). The data
digest in each entry is keyed (HMAC) with a secret kept in the ledger, so the head the
server sees tells it nothing about the data. Someone who can rewrite the file and its
anchor can forge both; only a witness held elsewhere catches that. Every spend is also
written, whole, to ``ledger.sqlite.spends`` before it commits (:mod:`fedmm.privacy.ledger_spends`):
a backup of the ledger lacks the spends made after it, that log does not.

>>> import tempfile, pathlib
>>> ledger = PrivacyLedger.create(pathlib.Path(tempfile.mkdtemp()) / "ledger.sqlite", site="george")
>>> entry = ledger.append(run_id="r1", round=1, noise_multiplier=1.0, sample_rate=0.25, steps=4,
...                       delta=1e-5, accountant="rdp", epsilon=1.9, epsilon_budget=8.0, data="d")
>>> entry.seq, ledger.verify().ok
(1, True)
>>> ledger.close()
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fedmm.errors import PrivacyError
from fedmm.privacy.events import PrivacyEvent
from fedmm.privacy.ledger_db import CREATE, SCHEMA_VERSION, checked, connect
from fedmm.privacy.ledger_entry import COLUMNS as _COLUMNS
from fedmm.privacy.ledger_entry import GENESIS, CarriedSpend, LedgerEntry, chain_problems, held_label
from fedmm.privacy.ledger_evidence import anchor_path, evidence, find_ledgers, lineage_problems, log_path, lost_message, made_here, missing_ledger
from fedmm.privacy.ledger_files import LedgerLock, append_log, read_anchor, read_log, write_anchor
from fedmm.privacy.ledger_spends import (
    RECOVERED, LogComparison, compare, log_rolled_back, log_spend, log_verdict, logged_spends, other_ledgers, replace_fix, spends_path,
)

__all__ = ["LedgerEntry", "ChainVerdict", "CarriedSpend", "PrivacyLedger", "MECHANISM", "SITE_STATS_MECHANISM", "find_ledgers", "missing_ledger"]  # the last two: fedmm.privacy.ledger_evidence's

_log = logging.getLogger(__name__)

MECHANISM = "dp-sgd: poisson-subsampled gaussian"
SITE_STATS_MECHANISM = "site statistics: gaussian, sample rate 1"  # sensor-norm=site under DP, once a run
_INIT = "fedmm ledger init {dir} --site {site}"


@dataclass(frozen=True)
class ChainVerdict:
    """Whether a ledger's chain holds, what is wrong where it does not, and what was tolerated."""

    ok: bool
    entries: int
    problems: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())  # tolerances used (an anchor one entry behind), to be stated


class PrivacyLedger:
    """A site's ledger file; use :meth:`create`, :meth:`open` or :meth:`read`. Entries are only ever appended."""

    def __init__(self, path: Path, db: sqlite3.Connection, *, lock: LedgerLock | None, writable: bool) -> None:
        self.path, self._db, self._lock, self.writable = path, db, lock, writable
        self._log_seen: tuple[tuple[object, ...], LogComparison] | None = None  # the last spend-log comparison and what it was of
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            self.close()
            raise PrivacyError(f"{path} is not a readable privacy ledger ({err}). Fix: restore it from a backup; never delete a ledger") from err
        self.site = str(meta.get("site", ""))
        self._meta = meta
        self.recovered: tuple[LedgerEntry, ...] = ()  # spends open() added back from the log (a restored backup lacked them)

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
            found = evidence(path)
            if found and carried is None:
                raise PrivacyError(lost_message(path, site, found))
            short = lineage_problems(path, site, "", carried, other_ledgers(spends_path(path), ""), made=False)
            if short:  # the spend log holds spends of ledgers before this one: it must carry them
                raise PrivacyError(short[0])
            created = _now()
            append_log(log_path(path), "replaced-lost" if carried else "created", site=site, reason=reason, ledger=created,
                       **({"carried_epsilon": carried.epsilon, "carried_delta": carried.delta, "evidence": found} if carried else {}))
            db = connect(path, readonly=False)
            db.executescript(CREATE)
            meta = {"site": site, "schema": str(SCHEMA_VERSION), "data_key": secrets.token_hex(32), "created": created, "spends_from": "1"}
            if carried is not None:
                meta.update(carried_epsilon=repr(carried.epsilon), carried_delta=repr(carried.delta), carried_reason=carried.reason)
            db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
            write_anchor(anchor_path(path), 0, GENESIS)
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
            found = evidence(path)
            if found:
                raise PrivacyError(lost_message(path, site or "NAME", found))
            if create_if_new and site:
                return cls.create(path, site=site, reason="a simulation's fresh per-run folder")
            raise PrivacyError(
                f"no privacy ledger at {path}: a site trains under DP only with its ledger. "
                f"Fix: run `{_INIT.format(dir=path.parent, site=site or 'NAME')}` once, when the site is set up"
            )
        lock = LedgerLock(path, wait=wait)
        try:
            ledger = cls(path, checked(path, readonly=False), lock=lock, writable=True)
        except BaseException:
            lock.release()
            raise
        if site is not None and ledger.site != site:
            ledger.close()
            raise PrivacyError(f"ledger {path} belongs to site {ledger.site!r}, not {site!r}. Fix: give each site its own state directory")
        ledger._recover_from_log(at_most=1)  # the one spend a crash between the spend log and the commit leaves
        verdict = ledger.verify()
        if not verdict.ok:  # never spend on top of a ledger that lost or changed entries: its budget check would be wrong
            behind = ledger._compare_with_log()
            try:
                entries = ledger.entries()
            except PrivacyError:
                entries = []
            ledger.close()
            fix = "Fix: restore the ledger and its .head anchor from a backup (fedmm audit shows what is wrong)"
            if behind.problems:
                fix = replace_fix(path, ledger.site, entries, ledger.carried, behind)
            elif behind.missing and not chain_problems(entries):  # a restored backup: the problem says how (recover)
                fix = "" if any("fedmm ledger recover" in problem for problem in verdict.problems[:3]) else (
                    f"Fix: `fedmm ledger recover {path.parent} --site {ledger.site}` adds back the spends its spend log holds")
            raise PrivacyError(f"the privacy ledger {path} does not verify ({'; '.join(verdict.problems[:3])}); the site refuses to train on it. {fix}".rstrip())
        ledger._prepare_for_writing()
        return ledger

    @classmethod
    def recover(cls, path: str | Path, *, site: str | None = None) -> tuple[LedgerEntry, ...]:
        """Add back to a ledger (restored from an older backup, or cut) the spends its spend log records past its end.

        ``fedmm ledger recover``; logged. Returns the entries added (none when the log holds
        nothing more, or what it holds does not continue the ledger's chain: :meth:`open` then says why).
        """
        path = Path(path)
        if not path.is_file():
            raise PrivacyError(f"no privacy ledger at {path}. Fix: restore ledger.sqlite from a backup first, then recover the spends made after it")
        lock = LedgerLock(path, wait=2.0)
        try:
            ledger = cls(path, checked(path, readonly=False), lock=lock, writable=True)
        except BaseException:
            lock.release()
            raise
        with ledger:
            if site is not None and ledger.site != site:
                raise PrivacyError(f"ledger {path} belongs to site {ledger.site!r}, not {site!r}. Fix: give the site's own state directory")
            ledger._recover_from_log(at_most=None)
            return ledger.recovered

    @classmethod
    def read(cls, path: str | Path) -> PrivacyLedger:
        """A ledger opened read-only for an audit: nothing is written, another schema is refused."""
        path = Path(path)
        if not path.is_file():
            raise PrivacyError(f"no privacy ledger at {path}. Fix: give the path of a site's ledger.sqlite (or its state directory)")
        return cls(path, checked(path, readonly=True), lock=None, writable=False)

    def _prepare_for_writing(self) -> None:
        if "data_key" not in self._meta:  # ledgers of fedmm 0.1 had none
            self._meta["data_key"] = secrets.token_hex(32)
            self._db.execute("INSERT INTO meta VALUES ('data_key', ?)", (self._meta["data_key"],))
        seq, digest = self.head()
        if not self._spends_from():  # a ledger made before the mark: its entries logged so far, and every later one
            logged, first = set(logged_spends(spends_path(self.path), self.ledger_id)[0]), seq + 1
            while first > 1 and first - 1 in logged:  # the newest entries the log holds, without a gap
                first -= 1
            self._meta["spends_from"] = str(first)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('spends_from', ?)", (self._meta["spends_from"],))
        anchor = read_anchor(self.head_path)
        if anchor is not None and anchor[0] == seq - 1 and self.verify(check_anchor=False).ok:
            # A crash between a commit and its anchor: the chain is intact, so bring the anchor up and say so.
            write_anchor(self.head_path, seq, digest)
            append_log(log_path(self.path), "anchor-repaired", site=self.site, reason=f"the anchor was at entry {anchor[0]}, the ledger at {seq}")

    def logged_ahead(self) -> tuple[LedgerEntry, ...]:
        """Spends the spend log records past this ledger's end that continue its chain (a crash's one, or a backup's lag)."""
        return self._compare_with_log().missing

    def _compare_with_log(self) -> LogComparison:
        try:
            return self._compare(self.entries())
        except PrivacyError:  # an entry of the wrong type: verify() reports it
            return LogComparison()

    def _compare(self, entries: list[LedgerEntry]) -> LogComparison:
        """``compare`` of these entries with the spend log, read again only when either changed (open() compares
        twice, and the log of a long-lived site is its whole history: 10,000 spends took 0.8 s a read)."""
        log = spends_path(self.path)
        try:
            stat = log.stat()
            seen: tuple[object, ...] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        except OSError:
            seen = ()
        key = (hash(tuple(e.hash for e in entries)), len(entries), seen)
        if self._log_seen is None or self._log_seen[0] != key:
            self._log_seen = (key, compare(entries, log, self.ledger_id, self.site, self._spends_from()))
        return self._log_seen[1]

    def _spends_from(self) -> int:
        """The first entry the spend log must hold: 1 for a ledger its folder's log records as made there (the mark in meta,
        outside the chain, is not taken then), else the mark (0: a ledger older than the log, until opened)."""
        try:
            mark = int(self._meta.get("spends_from", 0))
        except (TypeError, ValueError):
            return 1  # a damaged mark: every entry
        return 1 if mark < 0 or (mark != 1 and self.ledger_id in made_here(self.path)) else mark

    def _recover_from_log(self, *, at_most: int | None) -> None:
        """Add back the spends the log records past the ledger's end (a ledger restored from an older backup).

        Only when the ledger's own chain holds and the logged spends continue it, hash by hash; the
        anchor is brought up only when it names an entry of the recovered chain (or none).
        """
        comparison = self._compare_with_log()
        if not comparison.missing or comparison.problems or chain_problems(self.entries()) or (at_most is not None and len(comparison.missing) > at_most):
            return
        before_seq, before_epsilon = self.head()[0], (self.entries()[-1].epsilon if self.head()[0] else 0.0)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(f"INSERT INTO entries VALUES ({', '.join('?' * len(_COLUMNS))})", [tuple(asdict(e).values()) for e in comparison.missing])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        last, chain = comparison.missing[-1], {e.seq: e.hash for e in self.entries()}
        anchor = read_anchor(self.head_path)
        if anchor is None or anchor[0] == 0 or chain.get(anchor[0]) == anchor[1]:
            write_anchor(self.head_path, last.seq, last.hash)
        self.recovered = comparison.missing
        what = (f"the ledger ended at entry {before_seq} (epsilon {before_epsilon:.6g}); its spend log recorded entries "
                f"{comparison.missing[0].seq}-{last.seq} (up to epsilon {last.epsilon:.6g}), added back from it")
        append_log(log_path(self.path), RECOVERED, site=self.site, seqs=[e.seq for e in comparison.missing], epsilon=last.epsilon, reason=what)
        _log.warning("[fedmm] privacy ledger %s: %s (a ledger restored from an older backup lacks the spends made after it)", self.path, what)

    # ------------------------------------------------------------------ reading
    @property
    def ledger_id(self) -> str:
        """What names this ledger in its log (its creation time): a replacement's spends are not its own."""
        return str(self._meta.get("created", ""))

    @property
    def head_path(self) -> Path:
        return anchor_path(self.path)

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
        follows: int | None = None,
    ) -> LedgerEntry:
        """Append one spend and return it once it is durably on disk (spend log, then ledger, then head anchor).

        ``follows``: the newest entry's sequence number when the budget check that allows this
        spend read the ledger; the spend is refused if the ledger has moved on since (the check
        was of other entries). It is refused too when this process's lock file is no longer the
        one beside the ledger (removed while held: another process may have locked a new one).

        When ``epsilon`` is the figure stated before, held because ``accountant`` gives less (a
        stated epsilon never falls), and that figure came from another accountant, the entry's
        accountant reads ``max(accountant,other)`` (:func:`fedmm.privacy.ledger_entry.held_label`).
        """
        if not self.writable or self._lock is None:
            raise PrivacyError(f"ledger {self.path} is open read-only (or closed); a spend is recorded only by the site holding its lock")
        PrivacyEvent(noise_multiplier, sample_rate, steps)  # range checks
        carried = self.carried.epsilon if self.carried else 0.0
        if carried + epsilon > epsilon_budget * (1 + 1e-9):
            raise PrivacyError(f"ledger {self.path}: a spend to epsilon {carried + epsilon:.6g} is over the site's budget {epsilon_budget:g}; refused")
        self._db.execute("BEGIN IMMEDIATE")  # one writer; the head read below cannot go stale
        logged = False
        try:
            if not self._lock.still_held():
                raise PrivacyError(
                    f"ledger {self.path}: this process's lock file {self._lock.path} was removed or replaced while it held it, so "
                    "another process may have opened the ledger and be spending from it too; nothing was spent. Fix: stop every "
                    "fedmm site (or simulation) using this state directory, then start one; never remove a .lock file by hand "
                    "(the lock is the operating system's and goes with its process; the file only names the last holder)"
                )
            seq, prev = self.head()
            if follows is not None and seq != follows:
                raise PrivacyError(
                    f"ledger {self.path}: the budget check saw the ledger at entry {follows}, it is at entry {seq} now; nothing was "
                    "spent. Fix: stop the other process that spends from this ledger (one site process per state directory)"
                )
            last = self._db.execute("SELECT epsilon, accountant FROM entries WHERE seq = ?", (seq,)).fetchone()
            if last is not None and epsilon < float(last[0]):
                raise PrivacyError(f"ledger {self.path}: cumulative epsilon would fall from {last[0]} to {epsilon}; refused")
            # The figure stated before, held (a stated epsilon never falls): say which accountants it came from.
            label = held_label(str(accountant), str(last[1])) if last is not None and float(epsilon) == float(last[0]) else str(accountant)
            draft = LedgerEntry(
                seq + 1, self.site, run_id, int(round), str(mechanism), float(noise_multiplier), float(sample_rate), int(steps),
                float(delta), label, float(epsilon), float(epsilon_budget), data, _now(), prev, "",
            )
            entry = LedgerEntry(**{**asdict(draft), "hash": draft.expected_hash()})
            self._db.execute(f"INSERT INTO entries VALUES ({', '.join('?' * len(_COLUMNS))})", tuple(asdict(entry).values()))
            try:  # the log, which a backup of the ledger does not hold back, records the spend before it commits
                log_spend(spends_path(self.path), self.ledger_id, entry)
            except OSError as err:
                raise PrivacyError(f"cannot record the spend in the ledger's spend log {spends_path(self.path)} ({err}); nothing was spent. "
                                   "Fix: free disk space, or make the site's state directory writable") from err
            logged = True
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            if logged:
                try:
                    log_rolled_back(spends_path(self.path), self.ledger_id, entry)
                except OSError:
                    pass  # the logged spend stays: added back on the next open, it errs on the safe side
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
        problems = chain_problems(entries)
        notes: list[str] = []
        replaced = [e for e in read_log(log_path(self.path)) if e.get("event") == "replaced-lost"]
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
        comparison = self._compare(entries)
        problems += lineage_problems(self.path, self.site, self.ledger_id, self.carried, comparison.others)
        log_problems, log_notes = log_verdict(comparison, entries, self.path, self.site)
        problems, notes = problems + log_problems, notes + log_notes
        return ChainVerdict(not problems, len(entries), tuple(problems), tuple(notes))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
