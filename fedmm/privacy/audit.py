"""Audit of site ledgers: what each site spent, against which budget, and whether to believe it.

Nothing a ledger states is taken on trust: every entry's epsilon is recomputed from
the events (Opacus' accountant named in the entry, over all events up to it; the larger
of that and the figure recomputed for the entry before, since a stated epsilon never
falls, also when a site changes accountant between runs), the
hash chain and head anchor are verified, and each spend is checked against the
budget the site held when it made it. Ledgers are opened read-only, and a file that is not a
fedmm ledger is reported, never initialised. With witnesses (runs' ``privacy.json``, which
hold each site's ledger head as the server received it) a chain rewritten consistently
(hashes and anchor recomputed) is caught too: the witnessed entry is gone or differs.
A tolerance used (an anchor one entry behind) is stated as a note. ``fedmm audit`` prints this as a table, as
JSON (``--json``) or as an HTML report for a data-protection officer (``--html``,
:mod:`fedmm.privacy.audit_report`). Besides each entry, the audit keeps what that report needs:
the stated and recomputed totals (the headline is the larger), whether a witness matched, and
each run's own epsilon, noise, sample rate, steps and rounds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmm.config import AccountantKind
from fedmm.errors import PrivacyError
from fedmm.privacy.accounting import PrivacyEvent, SiteAccountant
from fedmm.privacy.ledger import PrivacyLedger, missing_ledger
from fedmm.privacy.ledger_entry import own_accountant

__all__ = ["SiteAudit", "audit_ledger", "load_witness", "run_summaries"]

_TOLERANCE = 1e-6  # relative: the recomputation runs the same accountant on the same events


@dataclass
class SiteAudit:
    """One site's ledger, checked."""

    site: str
    path: str
    entries: list[dict[str, Any]]
    runs: int
    accountant: str | None
    delta: float | None
    epsilon: float  # recomputed, after the last entry (0 for an empty ledger)
    epsilon_budget: float | None  # the budget the site held at its last spend
    remaining: float | None
    last_spend: str | None
    ledger_seq: int
    ledger_hash: str
    chain_ok: bool
    over_budget: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # tolerances used and carried spends, stated with the verdict
    epsilon_stated: float | None = None  # what the site's ledger states after its last entry (carried spend included)
    epsilon_recomputed: float | None = None  # what its events give after the last entry (carried spend included)
    witness_ok: bool | None = None  # every witness naming this site matched its ledger; None: no witness named it
    changes: list[dict[str, Any]] = field(default_factory=list)  # where the budget or delta differs from the entry before
    run_details: list[dict[str, Any]] = field(default_factory=list)  # per run: rounds, its own epsilon, noise, rate, steps

    @property
    def disagrees(self) -> bool:
        """The stated and the recomputed epsilon differ (the headline is then the larger one)."""
        if self.epsilon_stated is None or self.epsilon_recomputed is None:
            return False
        return not math.isclose(self.epsilon_stated, self.epsilon_recomputed, rel_tol=_TOLERANCE, abs_tol=1e-9)

    @property
    def ok(self) -> bool:
        return self.chain_ok and not self.over_budget and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def load_witness(path: str | Path) -> dict[str, tuple[int, str]]:
    """Each site's ledger head as a run's ``privacy.json`` recorded it: ``{site: (seq, hash)}``.

    Raises
    ------
    PrivacyError
        When the file is not a fedmm ``privacy.json`` (what, where and the fix).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        sites = data["sites"]
        heads = {str(s["site"]): (int(s["ledger_seq"]), str(s["ledger_hash"])) for s in sites if s.get("ledger_seq") is not None}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PrivacyError(f"{path} is not a run's privacy.json witness ({type(err).__name__}: {err}). Fix: give runs/<run-id>/privacy.json") from err
    return heads


def audit_ledger(path: str | Path, *, witnesses: Mapping[str, Mapping[str, tuple[int, str]]] | None = None) -> SiteAudit:
    """Read (read-only), verify and recompute one ledger; check it against each witness that names its site."""
    try:
        with PrivacyLedger.read(path) as ledger:
            verdict = ledger.verify()
            entries = ledger.entries() if verdict.entries or verdict.ok else []
            seq, digest = ledger.head()
            site, carried = ledger.site, ledger.carried
            ahead = ledger.logged_ahead()  # spends the ledger lacks: they count in the headline (the site counts them)
    except PrivacyError as err:
        lost = missing_ledger(Path(path))
        return SiteAudit(
            site=lost[0] if lost else "?", path=str(Path(path).resolve()), entries=[], runs=0, accountant=None, delta=None, epsilon=0.0,
            epsilon_budget=None, remaining=None, last_spend=None, ledger_seq=0, ledger_hash="", chain_ok=False,
            over_budget=False, problems=[lost[1] if lost else str(err)],
        )
    problems = list(verdict.problems)
    stored = {e.seq: e.hash for e in entries}
    witness_ok: bool | None = None
    for source, heads in (witnesses or {}).items():
        if site in heads:
            w_seq, w_hash = heads[site]
            witness_ok = witness_ok is not False and stored.get(w_seq) == w_hash
            if stored.get(w_seq) != w_hash:
                found = f"entry {w_seq} has hash {stored[w_seq][:12]}" if w_seq in stored else f"the ledger ends at entry {len(entries)}"
                problems.append(f"witness {source} recorded this site's ledger head as entry {w_seq} with hash {w_hash[:12]}; {found}: the ledger was rewritten or cut")
    carried_epsilon = carried.epsilon if carried else 0.0
    rows: list[dict[str, Any]] = []
    over = False
    held: list[str] = []  # entries stating a figure held from an earlier accountant's (theirs alone gives less)
    floor = 0.0  # the figure the entries before give: a stated epsilon never falls, as the site states it
    for i, entry in enumerate(entries):
        try:
            # The site's rule: its accountant over all the events, or the figure stated before if larger (another accountant's).
            own = SiteAccountant(AccountantKind(own_accountant(entry.accountant)), [e.event for e in entries[: i + 1]]).epsilon(entry.delta)
            recomputed = max(own, floor)
        except (ValueError, PrivacyError) as err:
            problems.append(f"entry {entry.seq}: cannot recompute epsilon ({err})")
            own = recomputed = math.inf
        if not math.isclose(recomputed, entry.epsilon, rel_tol=_TOLERANCE, abs_tol=1e-9):
            problems.append(f"entry {entry.seq}: the ledger states epsilon {entry.epsilon:.6g}, its events give {recomputed:.6g}")
        elif not math.isclose(own, recomputed, rel_tol=_TOLERANCE, abs_tol=1e-9):
            held.append(f"{entry.seq} ({entry.accountant}: {own_accountant(entry.accountant)} alone gives {own:.6g})")
        floor = recomputed if math.isfinite(recomputed) else max(floor, entry.epsilon)
        total = carried_epsilon + max(recomputed, entry.epsilon)  # the larger of stated and recomputed: never the kinder one
        if total > entry.epsilon_budget * (1 + _TOLERANCE):
            over = True
            problems.append(f"entry {entry.seq} (run {entry.run_id}, round {entry.round}): epsilon {total:.4f} is over the budget {entry.epsilon_budget:g}")
        rows.append({
            "seq": entry.seq, "run_id": entry.run_id, "round": entry.round, "mechanism": entry.mechanism,
            "noise_multiplier": entry.noise_multiplier, "sample_rate": entry.sample_rate, "steps": entry.steps,
            "delta": entry.delta, "accountant": entry.accountant, "epsilon": total, "epsilon_recomputed": recomputed,
            "epsilon_stated": entry.epsilon, "epsilon_budget": entry.epsilon_budget, "data": entry.data, "created": entry.created,
        })
    held_note = [(f"entry {'; entry '.join(held)} states the figure stated before it, the larger: a stated epsilon never falls, and "
                  "after a change of accountant the earlier one's figure can be above the new one's over all events (recomputed by "
                  "the same rule)")] if held else []
    changes = setting_changes(rows)
    last = rows[-1] if rows else None
    headline = max((r["epsilon"] for r in rows), default=carried_epsilon)  # cumulative: an earlier, larger figure still counts
    if ahead:  # a spend the spend log has and the ledger lacks left the site all the same, or may have: it counts
        headline = max(headline, carried_epsilon + max(e.epsilon for e in ahead))
        if headline > ahead[-1].epsilon_budget * (1 + _TOLERANCE):
            over = True
            problems.append(f"the spend log's entry {ahead[-1].seq} (run {ahead[-1].run_id}): epsilon {headline:.4f} is over the budget {ahead[-1].epsilon_budget:g}")
    return SiteAudit(
        site=site, path=str(Path(path).resolve()), entries=rows, runs=len({r["run_id"] for r in rows}),
        accountant=last["accountant"] if last else None, delta=(last["delta"] + (carried.delta if carried else 0.0)) if last else None,
        epsilon=headline, epsilon_budget=last["epsilon_budget"] if last else None,
        remaining=(last["epsilon_budget"] - headline) if last else None, last_spend=last["created"] if last else None,
        ledger_seq=seq, ledger_hash=digest, chain_ok=verdict.ok, over_budget=over, problems=problems,
        notes=list(verdict.notes) + held_note + [_change_note(c) for c in changes] + ([(f"carries epsilon {carried.epsilon:g} at delta {carried.delta:g} from a ledger lost for good ({carried.reason}); "
                                       "its spends are added by basic composition")] if carried else []),
        epsilon_stated=carried_epsilon + last["epsilon_stated"] if last else None,
        epsilon_recomputed=carried_epsilon + last["epsilon_recomputed"] if last else None,
        witness_ok=witness_ok, run_details=run_summaries(rows), changes=changes,
    )


def setting_changes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each entry whose epsilon budget or delta differs from the entry before: ``{seq, run_id, created, setting, before, after}``.

    A site may change its own settings between runs (a budget raised to go on, a delta loosened); each spend
    is checked against the budget it was made under, so only this list shows that the budget moved.
    """
    changes = []
    for before, entry in zip(rows, rows[1:]):
        for setting, key in (("epsilon budget", "epsilon_budget"), ("delta", "delta")):
            if entry[key] != before[key]:
                changes.append({"seq": entry["seq"], "run_id": entry["run_id"], "created": entry["created"], "setting": setting,
                                "before": before[key], "after": entry[key]})
    return changes


def _change_note(change: dict[str, Any]) -> str:
    raised = change["after"] > change["before"]
    why = {("epsilon budget", True): "spends from it on are checked against the larger budget",
           ("epsilon budget", False): "spends from it on are checked against the smaller budget",
           ("delta", True): "epsilon from it on is stated at the larger delta, a weaker guarantee",
           ("delta", False): "epsilon from it on is stated at the smaller delta"}[(change["setting"], raised)]
    return (f"{change['setting']} {'raised' if raised else 'lowered'} from {change['before']:g} to {change['after']:g} at entry {change['seq']} "
            f"(run {change['run_id']}, {change['created']}): {why}")


def run_summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run, in ledger order: its rounds, the rounds missing between them, its own epsilon (its events alone) and its parameters."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        runs.setdefault(row["run_id"], []).append(row)
    out = []
    for run_id, spends in runs.items():
        rounds = sorted({r["round"] for r in spends})
        try:
            kind = AccountantKind(own_accountant(spends[-1]["accountant"]))
            own = SiteAccountant(kind, [PrivacyEvent(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in spends]).epsilon(spends[-1]["delta"])
        except (ValueError, PrivacyError):
            own = math.inf
        out.append({
            "run_id": run_id, "rounds": rounds, "missing": sorted(set(range(1, rounds[-1] + 1)) - set(rounds)),
            "epsilon": own, "accountant": kind.value if math.isfinite(own) else spends[-1]["accountant"], "delta": spends[-1]["delta"], "noise_multipliers": sorted({r["noise_multiplier"] for r in spends}),
            "sample_rates": sorted({r["sample_rate"] for r in spends}), "steps": sum(r["steps"] for r in spends),
            "steps_per_round": sorted({r["steps"] for r in spends}), "first": spends[0]["created"], "last": spends[-1]["created"],
        })
    return out
