"""What the files beside a ledger say about it (no SQLite here): that one existed, where a folder's
ledgers are, and whether the ledger at a path is the one that folder made and carries what the
ledgers before it spent.

- :func:`evidence`, :func:`lost_message`, :func:`missing_ledger`: a ledger whose anchor, log,
  write-ahead log or spend log remains existed, and its absence is refused (never a fresh start);
- :func:`find_ledgers`: a folder's ledgers for an audit, a missing one included (reported, never
  left out);
- :func:`lineage_problems`: a ledger made elsewhere and copied in, or one that neither holds nor
  carries the spends the folder's spend log records of the ledgers before it (both would start the
  site's budget again).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from fedmm.privacy.ledger_entry import CarriedSpend
from fedmm.privacy.ledger_files import read_log
from fedmm.privacy.ledger_spends import spends_path

__all__ = ["anchor_path", "evidence", "find_ledgers", "lineage_problems", "log_path", "lost_message", "made_here", "missing_ledger"]

_MADE = ("created", "replaced-lost")  # the log's events that make a ledger in its folder


def anchor_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def log_path(path: Path) -> Path:
    return path.with_name(path.name + ".log")


def evidence(path: Path) -> list[str]:
    """What shows that a ledger existed at ``path``: its spend log, anchor and log, SQLite's side files."""
    companions = [anchor_path(path), log_path(path), path.with_name(path.name + "-wal")]
    found = [p.name for p in companions if p.exists()]
    return found or [p.name for p in [spends_path(path)] if p.exists()]  # the spend log too, if it alone is left


def lost_message(path: Path, site: str, evidence: list[str]) -> str:
    return (
        f"the privacy ledger {path} is missing, but {', '.join(evidence)} beside it show that site {site}'s ledger existed. "
        "The site refuses to start a new one: that would forget every epsilon it has spent. Fix: restore ledger.sqlite "
        "from a backup; if it is lost for good, run `fedmm ledger init "
        f"{path.parent} --site {site} --replace-lost --carried-epsilon E --carried-delta D --reason '...'` with the spend "
        "the site had made (the last privacy.json of the server, or the last audit of this ledger)"
    )


def find_ledgers(paths: Iterable[str | Path]) -> list[Path]:
    """Ledger files named directly, or found under directories (``**/ledger.sqlite``, and where one is missing but
    its anchor, log or spend log remains, its path: the audit then reports it missing, never leaves the site out)."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            beside = {p.with_name("ledger.sqlite") for pattern in ("ledger.sqlite.head", "ledger.sqlite.log", "ledger.sqlite.spends", "ledger.sqlite-wal")
                      for p in item.rglob(pattern)}
            found += sorted({*item.rglob("ledger.sqlite"), *beside})
        else:
            found.append(item)
    return found


def missing_ledger(path: Path) -> tuple[str, str] | None:
    """``(site, problem)`` when ``path`` has no ledger but files beside it show that one existed; else None."""
    found = evidence(path)
    if path.exists() or not found:
        return None
    sites = [str(e["site"]) for e in read_log(log_path(path)) if e.get("event") in _MADE and e.get("site")]
    site = sites[-1] if sites else path.parent.name
    return site, lost_message(path, site, found)


def made_here(path: Path) -> list[str]:
    """The ledgers (their ids) that the log beside ``path`` records as made in its folder (since 3 Dec)."""
    return [str(e["ledger"]) for e in read_log(log_path(path)) if e.get("event") in _MADE and e.get("ledger")]


def lineage_problems(path: Path, site: str, ledger_id: str, carried: CarriedSpend | None, others: Mapping[str, float], *,
                     made: bool = True) -> list[str]:
    """What is wrong with the ledger ``ledger_id`` at ``path`` as its folder's files tell it: not made here (the log
    records the ledgers made in this folder since 3 Dec; ``made=False``: a ledger about to be made, not asked), or not
    carrying ``others``, the largest epsilon the spend log records for each other ledger that spent from this folder
    (their sum, by basic composition)."""
    problems = []
    ids = made_here(path) if made else []
    if ids and ledger_id not in ids:
        problems.append(
            f"this ledger (made {ledger_id or 'at an unknown time'}) is not the ledger this folder's log records as made here "
            f"(the last: {ids[-1]}): one made elsewhere was copied in, and the site's budget would start again. Fix: put "
            "back this folder's own ledger and its .head anchor from a backup; if it is lost for good, `fedmm ledger init "
            f"{path.parent} --site {site} --replace-lost ...` with the spend it had made"
        )
    carried_epsilon = carried.epsilon if carried else 0.0
    spent = sum(others.values())
    if spent > carried_epsilon * (1 + 1e-9):
        problems.append(
            f"the spend log {spends_path(path).name} records the spends of another ledger of this folder "
            f"({', '.join(f'made {k}: up to epsilon {v:.6g}' for k, v in others.items())}) that this ledger neither "
            f"holds nor carries (this ledger carries {f'epsilon {carried_epsilon:g}' if carried else 'none'}): opened, it would start "
            "the site's budget again. Fix: put back the ledger that made them; if it is lost for good, move this one aside and "
            f"run `fedmm ledger init {path.parent} --site {site} --replace-lost --carried-epsilon {spent!r} ...`"
        )
    return problems
