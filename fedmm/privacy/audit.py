"""Audit of site ledgers: what each site spent, against which budget, and whether to believe it.

Nothing a ledger states is taken on trust: every entry's epsilon is recomputed from
the events (Opacus' accountant named in the entry, over all events up to it), the
hash chain and head anchor are verified, and each spend is checked against the
budget the site held when it made it. Ledgers are opened read-only, and a file that is not a
fedmm ledger is reported, never initialised. With witnesses (runs' ``privacy.json``, which
hold each site's ledger head as the server received it) a chain rewritten consistently
(hashes and anchor recomputed) is caught too: the witnessed entry is gone or differs.
A tolerance used (an anchor one entry behind) is stated as a note. ``fedmm audit`` prints this as a table, as
JSON (``--json``) or as an HTML report with a plot of epsilon over spends (``--html``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmm.config import AccountantKind
from fedmm.errors import PrivacyError
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ledger import PrivacyLedger

__all__ = ["SiteAudit", "audit_ledger", "load_witness", "render_html"]

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
    except PrivacyError as err:
        return SiteAudit(
            site="?", path=str(Path(path).resolve()), entries=[], runs=0, accountant=None, delta=None, epsilon=0.0,
            epsilon_budget=None, remaining=None, last_spend=None, ledger_seq=0, ledger_hash="", chain_ok=False,
            over_budget=False, problems=[str(err)],
        )
    problems = list(verdict.problems)
    stored = {e.seq: e.hash for e in entries}
    for source, heads in (witnesses or {}).items():
        if site in heads:
            w_seq, w_hash = heads[site]
            if stored.get(w_seq) != w_hash:
                found = f"entry {w_seq} has hash {stored[w_seq][:12]}" if w_seq in stored else f"the ledger ends at entry {len(entries)}"
                problems.append(f"witness {source} recorded this site's ledger head as entry {w_seq} with hash {w_hash[:12]}; {found}: the ledger was rewritten or cut")
    carried_epsilon = carried.epsilon if carried else 0.0
    rows: list[dict[str, Any]] = []
    over = False
    for i, entry in enumerate(entries):
        try:
            accountant = SiteAccountant(AccountantKind(entry.accountant), [e.event for e in entries[: i + 1]])
            recomputed = accountant.epsilon(entry.delta)
        except (ValueError, PrivacyError) as err:
            problems.append(f"entry {entry.seq}: cannot recompute epsilon ({err})")
            recomputed = math.inf
        if not math.isclose(recomputed, entry.epsilon, rel_tol=_TOLERANCE, abs_tol=1e-9):
            problems.append(f"entry {entry.seq}: the ledger states epsilon {entry.epsilon:.6g}, its events give {recomputed:.6g}")
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
    last = rows[-1] if rows else None
    return SiteAudit(
        site=site, path=str(Path(path).resolve()), entries=rows, runs=len({r["run_id"] for r in rows}),
        accountant=last["accountant"] if last else None, delta=(last["delta"] + (carried.delta if carried else 0.0)) if last else None,
        epsilon=last["epsilon"] if last else carried_epsilon, epsilon_budget=last["epsilon_budget"] if last else None,
        remaining=(last["epsilon_budget"] - last["epsilon"]) if last else None, last_spend=last["created"] if last else None,
        ledger_seq=seq, ledger_hash=digest, chain_ok=verdict.ok, over_budget=over, problems=problems,
        notes=list(verdict.notes) + ([f"carries epsilon {carried.epsilon:g} at delta {carried.delta:g} from a ledger lost for good ({carried.reason}); "
                                      "its spends are added by basic composition"] if carried else []),
    )


def plot_png(audits: list[SiteAudit]) -> bytes:
    """Epsilon after each spend, one line a site, with its budget dashed (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for audit in audits:
        if not audit.entries:
            continue
        xs = [r["seq"] for r in audit.entries]
        (line,) = ax.plot(xs, [r["epsilon"] for r in audit.entries], marker="o", markersize=3, label=audit.site)
        ax.plot(xs, [r["epsilon_budget"] for r in audit.entries], linestyle="--", color=line.get_color(), linewidth=1)
    ax.set_xlabel("spend (ledger entry)")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("Privacy spent per site (dashed: the site's budget)")
    if any(a.entries for a in audits):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def render_html(audits: list[SiteAudit]) -> str:
    """A self-contained HTML report: verdict, per-site table, the plot, and every problem found."""
    e = html.escape
    ok = all(a.ok for a in audits)
    rows = "".join(
        f"<tr><td>{e(a.site)}</td><td>{a.epsilon:.4f}</td><td>{'' if a.epsilon_budget is None else f'{a.epsilon_budget:g}'}</td>"
        f"<td>{'' if a.remaining is None else f'{a.remaining:.4f}'}</td><td>{'' if a.delta is None else f'{a.delta:g}'}</td>"
        f"<td>{e(a.accountant or '')}</td><td>{a.runs}</td><td>{len(a.entries)}</td><td>{e(a.last_spend or '')}</td>"
        f"<td>{'intact' if a.chain_ok else '<b>BROKEN</b>'}</td><td>{'<b>YES</b>' if a.over_budget else 'no'}</td></tr>"
        for a in audits
    )
    problems = "".join(f"<li>{e(a.site)}: {e(p)}</li>" for a in audits for p in a.problems) or "<li>none</li>"
    notes = "".join(f"<li>{e(a.site)}: {e(n)}</li>" for a in audits for n in a.notes) or "<li>none</li>"
    image = base64.b64encode(plot_png(audits)).decode()
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fedmm privacy audit</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style>"
        f"</head><body><h1>fedmm privacy audit</h1><p>Verdict: <b>{'every ledger intact and within budget' if ok else 'PROBLEMS FOUND'}</b>"
        f" ({len(audits)} ledger(s); epsilon recomputed from each ledger's events with the accountant it names)</p>"
        "<table><tr><th>site</th><th>epsilon</th><th>budget</th><th>remaining</th><th>delta</th><th>accountant</th><th>runs</th>"
        f"<th>spends</th><th>last spend (UTC)</th><th>hash chain</th><th>over budget</th></tr>{rows}</table>"
        f"<h2>Epsilon over spends</h2><img alt='cumulative epsilon per site' src='data:image/png;base64,{image}'>"
        f"<h2>Problems</h2><ul>{problems}</ul><h2>Notes</h2><ul>{notes}</ul></body></html>"
    )
