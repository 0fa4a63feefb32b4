"""The SQLite file of a site's ledger: its schema, and opening it (read-only for an audit, or for the site).

A file that is not a fedmm ledger of a known schema is refused, never made into one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fedmm.errors import PrivacyError
from fedmm.privacy.ledger_entry import COLUMNS

__all__ = ["SCHEMA_VERSION", "CREATE", "connect", "checked"]

SCHEMA_VERSION = 1

CREATE = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY, site TEXT NOT NULL, run_id TEXT NOT NULL, round INTEGER NOT NULL,
    mechanism TEXT NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL, epsilon REAL NOT NULL,
    epsilon_budget REAL NOT NULL, data TEXT NOT NULL, created TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
"""


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open the SQLite file at ``path``: read-only writing nothing (an audit), or for the site (WAL, ``synchronous=FULL``)."""
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
        raise _unreadable(path, err) from err
    return db


def _unreadable(path: Path, err: sqlite3.DatabaseError) -> PrivacyError:
    """A file SQLite cannot read: a site's own ledger is restored from a backup; any other file was the wrong one to give."""
    fix = ("restore it from a backup; never delete a ledger" if path.name == "ledger.sqlite" else
           "give the ledger.sqlite of a site's state directory (or the directory)")
    return PrivacyError(f"{path} is not a readable privacy ledger ({err}). Fix: {fix}")


def checked(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open ``path`` and refuse anything that is not a fedmm ledger of a known schema."""
    db = connect(path, readonly=readonly)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = tuple(row[1] for row in db.execute("PRAGMA table_info(entries)"))
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
    except sqlite3.DatabaseError as err:
        db.close()
        raise _unreadable(path, err) from err
    why = None
    if tables != {"meta", "entries"}:
        why = f"its tables are {sorted(tables) or 'none (an empty file)'}, a ledger has exactly meta and entries"
    elif columns != COLUMNS:
        why = f"its entries table has the columns {list(columns)}"
    elif meta.get("schema") != str(SCHEMA_VERSION) or not meta.get("site"):
        why = f"its meta table names schema {meta.get('schema')!r} and site {meta.get('site')!r}"
    if why:
        db.close()
        raise PrivacyError(f"{path} is not a fedmm privacy ledger: {why}. Nothing was changed. Fix: give the ledger.sqlite of a site's state directory")
    return db
