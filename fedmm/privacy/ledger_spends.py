"""The spend log beside a ledger, and how it compares with the ledger (no SQLite here).

Every spend is written to ``ledger.sqlite.spends`` (one ``spend`` line: the whole entry, its hash
included, and the ledger it belongs to) before the ledger commits it. That log only grows and is
not restored with a backup of the ledger, so it knows what a ledger restored from an older backup,
or cut, has lost:

- a logged spend the ledger holds under another hash: the ledger (or the log) was rewritten after
  the spend, stated with the verdict (only a witness held elsewhere tells which is true);
- logged spends past the ledger's newest entry that continue its chain (each one's hash matches its
  fields and names the one before): the spends the ledger lost (:func:`compare`'s ``missing``). One
  alone is what a crash between the log and the commit leaves (that spend never left the site): the
  site adds it back when it opens the ledger, which errs on the safe side. More are a ledger restored
  from an older backup, or cut: the site refuses it until ``fedmm ledger recover`` adds them back;
- logged spends past the ledger's end that do not continue its chain, a damaged log line (not
  JSON: torn or edited, or a record that does not match its hash), or a logged spend the ledger
  holds under another hash (one of them was rewritten): a problem; the site does not train until
  it is fixed, and the fix names the epsilon to carry over (none from a log with a torn line).

A line whose append was rolled back (the commit failed) is cancelled by a ``spend-rolled-back``
line. Spends logged for another ledger (one replaced after a loss) are not this one's, but they
were spent from this folder: the ledger must carry them (:func:`other_ledgers`), or a ledger made
elsewhere and copied over the site's would start its budget again. And every entry of a ledger
from its ``spends_from`` on (its first, for a ledger made since the log existed) must be in the
log: a ledger restored from an older backup *and* its log removed would otherwise open behind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmm.errors import PrivacyError
from fedmm.privacy.ledger_entry import GENESIS, CarriedSpend, LedgerEntry
from fedmm.privacy.ledger_files import append_log, read_log

__all__ = ["spends_path", "SPEND", "ROLLED_BACK", "RECOVERED", "LogComparison", "log_spend", "log_rolled_back", "logged_spends", "other_ledgers", "compare", "log_verdict", "replace_fix"]

SPEND = "spend"
ROLLED_BACK = "spend-rolled-back"
RECOVERED = "recovered-from-log"


def spends_path(ledger: Path) -> Path:
    """The spend log of the ledger at ``ledger``: ``<ledger>.spends``."""
    return ledger.with_name(ledger.name + ".spends")


def log_spend(log: Path, ledger_id: str, entry: LedgerEntry) -> None:
    """Record ``entry`` in the log, durably (before the ledger commits it)."""
    append_log(log, SPEND, ledger=ledger_id, seq=entry.seq, entry=asdict(entry))


def log_rolled_back(log: Path, ledger_id: str, entry: LedgerEntry) -> None:
    """Cancel the logged ``entry``: its commit failed and the ledger rolled it back."""
    append_log(log, ROLLED_BACK, ledger=ledger_id, seq=entry.seq, hash=entry.hash)


def logged_spends(log: Path, ledger_id: str, lines: list[dict[str, Any]] | None = None) -> tuple[dict[int, LedgerEntry], list[str]]:
    """This ledger's spends as its log records them, by sequence number (the latest line for each), and damaged lines
    (``lines``: the log's, when read already)."""
    spends: dict[int, LedgerEntry] = {}
    damaged: list[str] = []
    for number, line in enumerate(read_log(log) if lines is None else lines, start=1):
        if line.get("event") == "unreadable":  # not JSON (torn by a crash, or edited): whose spend it was is unknown
            damaged.append(f"line {number} of {log.name} is not a whole record (torn or edited): the spend it held cannot be read")
            continue
        if line.get("ledger") != ledger_id or line.get("event") not in (SPEND, ROLLED_BACK):
            continue
        if line["event"] == ROLLED_BACK:
            seq = line.get("seq")
            if isinstance(seq, int) and seq in spends and spends[seq].hash == line.get("hash"):
                del spends[seq]
            continue
        try:
            record: Any = line.get("entry")
            entry = LedgerEntry.from_mapping(record if isinstance(record, dict) else {})
        except PrivacyError as err:
            damaged.append(f"line {number} of {log.name} ({err})")
            continue
        if entry.hash != entry.expected_hash():
            damaged.append(f"line {number} of {log.name}: its record of entry {entry.seq} (epsilon {entry.epsilon:.6g}) does not match its hash (edited)")
            continue
        spends[entry.seq] = entry
    return spends, damaged


def other_ledgers(log: Path, ledger_id: str, lines: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """The largest epsilon the log records for each ledger other than ``ledger_id`` that spent from this folder (as
    stated, a record that does not match its hash too: the figure errs on the safe side)."""
    spends: dict[str, dict[object, tuple[object, float]]] = {}
    for line in read_log(log) if lines is None else lines:
        other, record = line.get("ledger"), line.get("entry")
        if other in (None, ledger_id):
            continue
        own = spends.setdefault(str(other), {})
        if line.get("event") == SPEND and isinstance(record, dict) and isinstance(record.get("epsilon"), (int, float)):
            own[line.get("seq")] = (record.get("hash"), float(record["epsilon"]))
        elif line.get("event") == ROLLED_BACK and line.get("seq") in own and own[line.get("seq")][0] == line.get("hash"):
            del own[line.get("seq")]
    return {other: max(e for _, e in own.values()) for other, own in sorted(spends.items()) if own}


def _damaged_epsilon(log: Path, ledger_id: str) -> float:
    """The largest epsilon any record of this ledger's log states, damaged or not (for a fix that must not carry too little)."""
    top = 0.0
    for line in read_log(log):
        record = line.get("entry")
        if line.get("ledger") == ledger_id and isinstance(record, dict) and isinstance(record.get("epsilon"), (int, float)):
            top = max(top, float(record["epsilon"]))
    return top


@dataclass(frozen=True)
class LogComparison:
    """A ledger against its log: the spends it lacks that the log can give back, and what cannot be squared."""

    missing: tuple[LedgerEntry, ...] = ()  # logged past the ledger's end, continuing its chain: to add back, in order
    problems: tuple[str, ...] = field(default=())
    logged_epsilon: float = 0.0  # the largest epsilon the log records for this ledger
    logged_delta: float = 0.0  # the delta it is stated at
    rewritten: tuple[str, ...] = field(default=())  # entries the ledger holds under another hash than the log: stated
    unreadable: bool = False  # a line of the log is not a whole record: the log cannot say how much was spent
    absent: tuple[int, ...] = ()  # entries the ledger holds (from its spends_from on) that the log does not: the log was removed or cut
    others: dict[str, float] = field(default_factory=dict)  # other ledgers that spent from this folder: the largest epsilon of each


def compare(entries: list[LedgerEntry], log: Path, ledger_id: str, site: str, spends_from: int = 0) -> LogComparison:
    """Compare a ledger's entries (in order) with the spends its log records for it (``ledger_id``, ``site``);
    each entry from ``spends_from`` on (0: none) must be there."""
    lines = read_log(log)
    logged, damaged = logged_spends(log, ledger_id, lines)
    absent = tuple(e.seq for e in entries if spends_from and e.seq >= spends_from and e.seq not in logged)
    problems = [f"the ledger's spend log is damaged: {d}" for d in damaged]
    stored = {e.seq: e for e in entries}
    head_seq, head_hash = (entries[-1].seq, entries[-1].hash) if entries else (0, GENESIS)
    head_epsilon = entries[-1].epsilon if entries else 0.0
    # A logged spend the ledger holds otherwise: the ledger or the log was rewritten after the spend. Which one only a
    # witness held elsewhere tells; either way the site does not train on the ledger's figure (a problem, not a note).
    problems += [
        f"the spend log {log.name} records entry {seq} (epsilon {logged[seq].epsilon:.6g}, noise {logged[seq].noise_multiplier:g}) "
        f"with hash {logged[seq].hash[:12]}, the ledger's entry {seq} (epsilon {stored[seq].epsilon:.6g}, noise "
        f"{stored[seq].noise_multiplier:g}) has {stored[seq].hash[:12]}: the ledger or its spend log was rewritten after the spend; "
        "a witness held elsewhere (--witness privacy.json) tells which is true"
        for seq in sorted(s for s in logged if s in stored and logged[s].hash != stored[s].hash)
    ]
    rewritten: list[str] = []
    ahead = [logged[s] for s in sorted(s for s in logged if s > head_seq)]
    top = max(logged.values(), key=lambda e: e.epsilon, default=None)
    missing: list[LedgerEntry] = []
    prev_seq, prev_hash = head_seq, head_hash
    for entry in ahead:
        if entry.seq != prev_seq + 1 or entry.prev_hash != prev_hash or entry.site != site:
            last = ahead[-1]
            problems.append(
                f"the ledger ends at entry {head_seq} (epsilon {head_epsilon:.6g}), but its spend log {log.name} records spends up to "
                f"entry {last.seq} (epsilon {last.epsilon:.6g}, run {last.run_id}, round {last.round}) that do not continue its "
                f"chain (at entry {entry.seq}): they cannot be added back"
            )
            missing = []
            break
        missing.append(entry)
        prev_seq, prev_hash = entry.seq, entry.hash
    logged_epsilon = max(top.epsilon if top else 0.0, _damaged_epsilon(log, ledger_id) if damaged else 0.0)
    return LogComparison(tuple(missing), tuple(problems), logged_epsilon, top.delta if top else 0.0, tuple(rewritten),
                         unreadable=any("not a whole record" in d for d in damaged), absent=absent, others=other_ledgers(log, ledger_id, lines))


def log_verdict(comparison: LogComparison, entries: list[LedgerEntry], path: Path, site: str) -> tuple[list[str], list[str]]:
    """The problems and the tolerated notes of a ledger (``path``) its log knows more of."""
    problems, notes = list(comparison.problems), list(comparison.rewritten[:3])
    log = spends_path(path)
    if comparison.absent:
        low, high = comparison.absent[0], comparison.absent[-1]
        which = f"entry {low}" if low == high else f"entries {low}-{high} ({len(comparison.absent)})"
        problems.append(
            f"the spend log {log.name} lacks {which} of the ledger (every spend is logged before it commits): the log was "
            "removed or cut, so it cannot show the spends a restored copy of the ledger lacks. Fix: put back the spend log; if it "
            f"is lost, move {path.name} aside (keep it) and run `fedmm ledger init {path.parent} --site {site} --replace-lost "
            "--carried-epsilon E --carried-delta D --reason '...'` with the site's spend as the server last recorded it (its "
            "privacy.json), plus any spend of a run the server never saw"
        )
    if len(comparison.missing) > 1:
        first, last = comparison.missing[0], comparison.missing[-1]
        problems.append(
            f"the ledger ends at entry {first.seq - 1} (epsilon {entries[-1].epsilon if entries else 0.0:.6g}), but its spend log {log.name} "
            f"records the spends of entries {first.seq}-{last.seq} (up to epsilon {last.epsilon:.6g}, run {last.run_id}, round "
            f"{last.round}): it was restored from an older backup, or cut, and lacks them. "
            f"Fix: `fedmm ledger recover {path.parent} --site {site}` adds them back from the spend log"
        )
    elif comparison.missing:
        notes.append(
            f"tolerated: the spend log records entry {comparison.missing[0].seq} (epsilon {comparison.missing[0].epsilon:.6g}) past the "
            "ledger's end, as a crash between that log and the commit leaves it; the same picture results if the newest entry was "
            "removed, which only a witness (--witness privacy.json) can rule out. The site adds it back when it next opens the ledger"
        )
    return problems, notes


def replace_fix(path: Path, site: str, entries: list[LedgerEntry], carried: CarriedSpend | None, comparison: LogComparison) -> str:
    """The fix for a ledger whose log shows spends it lacks and cannot be given back: replace it, carrying what the log says."""
    carried = carried or CarriedSpend(0.0, 0.0, "")
    if comparison.unreadable:  # a torn or edited line may have held the largest spend: no figure from this log is safe
        return (
            f"Its spend log {spends_path(path).name} has a line that is not a whole record, so it cannot tell how much the site "
            "spent. Fix: restore a backup that holds every spend; else move "
            f"{path.name} aside (keep it) and run `fedmm ledger init {path.parent} --site {site} --replace-lost --carried-epsilon E "
            "--carried-delta D --reason '...'` with E and D the site's spend as the server last recorded it (its privacy.json; "
            "`fedmm audit --witness` checks a ledger against it), plus any spend of a run the server never saw"
        )
    spent = carried.epsilon + max(comparison.logged_epsilon, entries[-1].epsilon if entries else 0.0)
    delta = carried.delta + (entries[-1].delta if entries else comparison.logged_delta)
    return (
        f"Its spend log {spends_path(path).name} shows the site spent up to epsilon {spent:.6g} (delta {delta:g}), more than this ledger holds "
        "(a backup lacks the spends made after it). Fix: restore a backup that holds every logged spend; else move "
        f"{path.name} aside (keep it) and run `fedmm ledger init {path.parent} --site {site} --replace-lost --carried-epsilon "
        f"{spent!r} --carried-delta {delta!r} --reason '...'`"
    )
