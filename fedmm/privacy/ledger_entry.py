"""One entry of a site's privacy ledger, as stored (and as its log records it), and its accountant label.

An entry's hash covers its fields and the previous entry's hash (:meth:`LedgerEntry.expected_hash`).
Its ``accountant`` names the accountant its cumulative epsilon is stated with. A stated epsilon
never falls, so when a site changes accountant between runs, the figure of its new accountant
over all its events can be below the figure it stated before; the site then states the larger,
the earlier figure, and the entry says so: ``max(prv,rdp)`` reads "the larger of the prv figure
over all this site's events and the figure stated before, which came from rdp"
(:func:`held_label`). The audit applies the same rule (:func:`own_accountant` is the first name).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from fedmm.errors import PrivacyError
from fedmm.privacy.events import PrivacyEvent

__all__ = ["LedgerEntry", "CarriedSpend", "GENESIS", "COLUMNS", "chain_problems", "held_label", "own_accountant", "accountants_named"]

GENESIS = "0" * 64
COLUMNS = (
    "seq", "site", "run_id", "round", "mechanism", "noise_multiplier", "sample_rate", "steps",
    "delta", "accountant", "epsilon", "epsilon_budget", "data", "created", "prev_hash", "hash",
)
_TYPES = {"seq": int, "round": int, "steps": int, "noise_multiplier": float, "sample_rate": float, "delta": float, "epsilon": float, "epsilon_budget": float}


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
    accountant: str  # "rdp", "prv", or "max(prv,rdp)": the figure held from an earlier accountant's (module docstring)
    epsilon: float  # cumulative over this site's entries up to this one, at ``delta``
    epsilon_budget: float  # the site's budget when it made this spend
    data: str  # keyed digest of the training data the spend was on
    created: str  # UTC, ISO 8601
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> LedgerEntry:
        """An entry from a stored row, each field checked for its type (a text epsilon is a break, not a crash)."""
        return cls.from_mapping(dict(zip(COLUMNS, row)))

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> LedgerEntry:
        """An entry from its fields by name (a stored row, or a log line's record), each checked for its type."""
        if set(values) != set(COLUMNS):
            raise PrivacyError(f"ledger entry {values.get('seq')!r}: fields {sorted(values)}, an entry has {list(COLUMNS)}")
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
class CarriedSpend:
    """The spend of a ledger lost for good, carried into its replacement (basic composition)."""

    epsilon: float
    delta: float
    reason: str


def chain_problems(entries: list[LedgerEntry]) -> list[str]:
    """What breaks the hash chain: a removed, reordered or edited entry, or a falling epsilon."""
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
    return problems


def accountants_named(label: str) -> list[str]:
    """The accountants an entry's label names, its own first: ``"max(prv,rdp)"`` -> ``["prv", "rdp"]``."""
    if label.startswith("max(") and label.endswith(")"):
        return [name.strip() for name in label[4:-1].split(",") if name.strip()]
    return [label]


def own_accountant(label: str) -> str:
    """The accountant an entry was accounted with (its figure over all events): the first its label names."""
    names = accountants_named(label)
    return names[0] if names else label


def held_label(own: str, previous: str) -> str:
    """The label of an entry whose figure is the one stated before it (labelled ``previous``), held since ``own`` gives less.

    ``own`` alone when the earlier figure came from the same accountant; else ``max(own,others)``.
    """
    names = [own, *(name for name in accountants_named(previous) if name != own)]
    return own if len(names) == 1 else f"max({','.join(names)})"
