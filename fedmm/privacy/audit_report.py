"""``fedmm audit --html``: the audit as one offline page for a data-protection officer.

The page is self-contained (inline CSS, PNG plots drawn with matplotlib's Agg backend and
embedded as ``data:`` URLs, no script, no external address); every string read from a ledger
or a path goes through :func:`html.escape`. From the top:

- the header: report date (UTC), fedmm version, the ledgers audited, the witness files and
  whether every ledger head matched them, and the privacy unit the epsilons are about;
- a warnings box: sites whose budget is exhausted (under 1 % or under 0.05 epsilon left) or
  nearly so (under 20 %), ledgers that failed verification, stated and recomputed epsilons
  that disagree, and rounds missing from a run;
- a table per site (budget, spent, remaining, status, ledger head and entry count, verification,
  accountant, delta); where the site's stated and the recomputed epsilon disagree both are
  shown and the larger one is the headline;
- one panel per site (small multiples on one y-axis from 0, the budget dashed): cumulative
  epsilon by round of each run (a marker per recorded round, no line across a missing round)
  and by the wall-clock time of each spend;
- a table per run: rounds, the run's own epsilon, noise multiplier, sample rate, steps;
- every problem and note of the audit in full.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fedmm import __version__
from fedmm.privacy.audit import SiteAudit

__all__ = ["PRIVACY_UNIT", "render_html", "site_status"]

PRIVACY_UNIT = "one record (sample) of a site's training data; add/remove-one neighbours, as Opacus' accountants assume"
EXHAUSTED_SHARE, EXHAUSTED_EPSILON, NEAR_SHARE = 0.01, 0.05, 0.20
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
_CSS = (
    "body{font-family:sans-serif;margin:1.5em 2em;max-width:1150px;color:#222}h1{margin-bottom:.2em}"
    "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.num .small{white-space:normal}.meta th{width:14em}"
    ".warnings{border:2px solid #c00;background:#fff4f4;padding:.4em 1em;margin:1em 0}.warnings.clear{border-color:#2a7;background:#f2fbf5}"
    ".warnings h2{margin:.3em 0}.bad{color:#b00;font-weight:bold}.warn{color:#b35900;font-weight:bold}.good{color:#176b3a}"
    "code.hash{word-break:break-all;font-size:85%}figure{margin:0 0 1em}figcaption{font-size:90%;color:#444}"
    ".small{font-size:90%;color:#444}"
)


def site_status(audit: SiteAudit) -> tuple[str, str]:
    """The budget status of a site and its CSS class: over budget, exhausted, near exhausted, within budget, no spends."""
    if audit.remaining is None or audit.epsilon_budget is None:
        return ("unreadable", "bad") if audit.site == "?" else ("no spends", "good")
    if audit.over_budget or audit.remaining < 0:
        return "OVER BUDGET", "bad"
    if audit.remaining < EXHAUSTED_SHARE * audit.epsilon_budget or audit.remaining < EXHAUSTED_EPSILON:
        return "EXHAUSTED", "bad"
    if audit.remaining < NEAR_SHARE * audit.epsilon_budget:
        return "near exhausted", "warn"
    return "within budget", "good"


def _verified(audit: SiteAudit) -> bool:
    return audit.chain_ok and audit.witness_ok is not False and audit.site != "?"


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else ("inf" if math.isinf(value) else f"{value:.{digits}f}")


def _values(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _ranges(rounds: Sequence[int]) -> str:
    """``[1, 2, 4, 5]`` -> ``1-2, 4-5``."""
    out: list[str] = []
    start = prev = rounds[0]
    for r in [*rounds[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(f"{start}" if start == prev else f"{start}\u2013{prev}")
        if r is not None:
            start = prev = r
    return ", ".join(out)


def _headline(audit: SiteAudit) -> str:
    """Spent epsilon; where stated and recomputed disagree, both, and why the larger is counted."""
    e = html.escape
    if not audit.disagrees:
        return _num(audit.epsilon)
    larger = "stated" if (audit.epsilon_stated or 0) >= (audit.epsilon_recomputed or 0) else "recomputed"
    return (f"<b>{_num(audit.epsilon)}</b><br><span class='small'>stated {_num(audit.epsilon_stated)} / recomputed "
            f"{_num(audit.epsilon_recomputed)}: the {e(larger)} figure is counted, the larger (conservative) one, "
            "since the two disagree</span>")


def _warnings(audits: Sequence[SiteAudit]) -> tuple[list[str], list[str]]:
    e = html.escape
    warnings: list[str] = []
    notes: list[str] = []
    for a in audits:
        status, _ = site_status(a)
        name = f"<b>{e(a.site)}</b>"
        if status in ("OVER BUDGET", "EXHAUSTED"):
            warnings.append(f"{name} is <span class='bad'>{status}</span>: {_num(a.remaining)} of its budget {a.epsilon_budget:g} left "
                            f"(spent {_num(a.epsilon)}); treat its budget as spent")
        elif status == "near exhausted":
            warnings.append(f"{name} is <span class='warn'>near exhausted</span>: {_num(a.remaining)} of its budget {a.epsilon_budget:g} "
                            f"left ({100 * (a.remaining or 0) / (a.epsilon_budget or 1):.1f} %)")
        if not _verified(a):
            why = "; ".join(a.problems[:3]) or "the chain does not verify"
            more = f" (and {len(a.problems) - 3} more below)" if len(a.problems) > 3 else ""
            warnings.append(f"{name}: the ledger <span class='bad'>FAILED verification</span>; its figures cannot be trusted: {e(why)}{more}")
        if a.disagrees:
            warnings.append(f"{name}: the ledger states epsilon {_num(a.epsilon_stated)}, its events give {_num(a.epsilon_recomputed)}; "
                            f"this report counts the larger, {_num(a.epsilon)}")
        for run in a.run_details:
            if run["missing"]:
                notes.append(f"{name}, run {e(run['run_id'])}: round(s) {_ranges(run['missing'])} not in the ledger (the site did not "
                             "train then, or the entry was removed: the verification result says which)")
        notes += [f"{name}: {e(n)}" for n in a.notes]
    return warnings, notes


def render_html(audits: list[SiteAudit], *, witnesses: Sequence[str] = (), now: datetime | None = None) -> str:
    """The audit as one self-contained, script-free HTML page (see the module docstring)."""
    e = html.escape
    now = now or datetime.now(UTC)
    ok = all(a.ok for a in audits)
    warnings, notes = _warnings(audits)
    named = [a for a in audits if a.witness_ok is not None]
    if not witnesses:
        witness = "none given: a chain rewritten consistently (hashes and anchor recomputed) cannot be ruled out"
    elif all(a.witness_ok is not False for a in audits) and all(a.site != "?" for a in audits):
        unnamed = ", ".join(a.site for a in audits if a.witness_ok is None)
        witness = (f"{e(', '.join(witnesses))}: <span class='good'>every ledger head it records matched</span> ({len(named)} site(s) named"
                   + (f"; not named: {e(unnamed)})" if unnamed else ")"))
    else:
        bad = ", ".join(a.site for a in audits if a.witness_ok is False or a.site == "?")
        witness = f"{e(', '.join(witnesses))}: <span class='bad'>MISMATCH</span> for {e(bad)}"
    header = (
        f"<tr><th>report date (UTC)</th><td>{now.astimezone(UTC):%Y-%m-%d %H:%M:%S}</td></tr>"
        f"<tr><th>fedmm version</th><td>{e(__version__)}</td></tr>"
        f"<tr><th>ledgers audited</th><td>{'<br>'.join(f'<code>{e(a.path)}</code>' for a in audits)}</td></tr>"
        f"<tr><th>witness</th><td>{witness}</td></tr>"
        f"<tr><th>privacy unit</th><td>{e(PRIVACY_UNIT)}</td></tr>"
        "<tr><th>method</th><td>every epsilon recomputed from the ledger's events with the accountant each entry names; "
        "where the stated and the recomputed figure differ, the larger is counted</td></tr>"
    )
    box = (f"<section class='warnings'><h2>Warnings ({len(warnings)})</h2><ul>{''.join(f'<li>{w}</li>' for w in warnings)}</ul>"
           if warnings else "<section class='warnings clear'><h2>Warnings: none</h2><p>every site within budget and its ledger verified</p>")
    box += (f"<p class='small'>Noted:</p><ul class='small'>{''.join(f'<li>{n}</li>' for n in notes)}</ul>" if notes else "") + "</section>"
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fedmm privacy audit</title>"
        f"<style>{_CSS}</style></head><body><h1>fedmm privacy audit</h1>"
        f"<p>Verdict: <b class='{'good' if ok else 'bad'}'>{'every ledger intact and within budget' if ok else 'PROBLEMS FOUND'}</b>"
        f" ({len(audits)} ledger(s))</p>{box}<table class='meta'>{header}</table>"
        f"<h2>Sites</h2>{_site_table(audits)}<h2>Cumulative epsilon per site</h2>"
        "<p class='small'>One panel per site, all on the same y-axis (from 0). Left: by round of each run, a marker per round "
        "recorded in the ledger; a missing round leaves a gap (shaded). Right: by the wall-clock time of each spend (UTC). "
        "Dashed: the site's budget.</p>"
        f"{_figures(audits)}<h2>Runs</h2>{_run_table(audits)}<h2>Problems and notes in full</h2>{_details(audits)}</body></html>"
    )


def _site_table(audits: Sequence[SiteAudit]) -> str:
    e = html.escape
    rows = []
    for a in audits:
        status, cls = site_status(a)
        if a.entries and not _verified(a):
            status += " (by unverified figures)"
        witness = {None: "no witness", True: "witness matched", False: "<span class='bad'>witness MISMATCH</span>"}[a.witness_ok]
        chain = "<span class='good'>chain intact</span>" if a.chain_ok else "<span class='bad'>chain BROKEN</span>"
        agree = "<span class='bad'>stated &ne; recomputed</span>" if a.disagrees else "stated = recomputed" if a.entries else ""
        rows.append(
            f"<tr><td>{e(a.site)}</td><td class='num'>{'' if a.epsilon_budget is None else f'{a.epsilon_budget:g}'}</td>"
            f"<td class='num'>{_headline(a)}</td><td class='num'>{_num(a.remaining)}</td><td class='{cls}'>{e(status)}</td>"
            f"<td>entry {a.ledger_seq}<br><code class='hash'>{e(a.ledger_hash)}</code></td><td class='num'>{len(a.entries)}</td>"
            f"<td>{'<span class=good>verified</span>' if _verified(a) and not a.disagrees else '<span class=bad>FAILED</span>'}"
            f"<br><span class='small'>{chain}; {witness}{'; ' + agree if agree else ''}</span></td>"
            f"<td>{e(a.accountant or '')}</td><td class='num'>{'' if a.delta is None else f'{a.delta:g}'}</td></tr>"
        )
    return ("<table class='sites'><tr><th>site</th><th>budget (&epsilon;)</th><th>spent (&epsilon;)</th><th>remaining</th><th>status</th>"
            "<th>ledger head</th><th>entries</th><th>verification</th><th>accountant</th><th>delta</th></tr>" + "".join(rows) + "</table>")


def _run_table(audits: Sequence[SiteAudit]) -> str:
    e = html.escape
    rows = []
    for a in audits:
        for run in a.run_details:
            missing = f" <span class='warn'>(missing: {_ranges(run['missing'])})</span>" if run["missing"] else ""
            per_round = _values(run["steps_per_round"])
            rows.append(
                f"<tr><td>{e(run['run_id'])}</td><td>{e(a.site)}</td><td>{_ranges(run['rounds'])}{missing}</td>"
                f"<td>{e(run['first'][:16].replace('T', ' '))} &ndash; {e(run['last'][:16].replace('T', ' '))}</td>"
                f"<td class='num'>{_num(run['epsilon'])} ({e(str(run.get('accountant', '?')))}, &delta; {run['delta']:g})</td><td class='num'>{_values(run['noise_multipliers'])}</td>"
                f"<td class='num'>{_values(run['sample_rates'])}</td><td class='num'>{run['steps']} ({e(per_round)} a round)</td></tr>"
            )
    return ("<p class='small'>A run's epsilon is that of its own events alone, under the accountant the run used (named with "
            "it), at the delta of its last entry; a site's runs compose, so its spent epsilon above is more than any one run's.</p>"
            "<table class='runs'><tr><th>run</th><th>site</th><th>rounds</th><th>spends (UTC)</th><th>epsilon of this run</th>"
            "<th>noise multiplier</th><th>sample rate</th><th>steps</th></tr>" + ("".join(rows) or "<tr><td colspan=8>no runs</td></tr>") + "</table>")


def _details(audits: Sequence[SiteAudit]) -> str:
    e = html.escape
    problems = "".join(f"<li>{e(a.site)}: {e(p)}</li>" for a in audits for p in a.problems) or "<li>none</li>"
    notes = "".join(f"<li>{e(a.site)}: {e(n)}</li>" for a in audits for n in a.notes) or "<li>none</li>"
    return f"<h3>Problems</h3><ul>{problems}</ul><h3>Notes</h3><ul>{notes}</ul>"


def _figures(audits: Sequence[SiteAudit]) -> str:
    e = html.escape
    finite = [v for a in audits for r in a.entries for v in (r["epsilon"], r["epsilon_budget"]) if math.isfinite(v)]
    top = 1.1 * max(finite, default=1.0)
    out = []
    for i, a in enumerate(audits):
        status, cls = site_status(a)
        image = base64.b64encode(_panel_png(a, _COLOURS[i % len(_COLOURS)], top)).decode()
        out.append(
            f"<figure class='panel'><img alt='cumulative epsilon of site {e(a.site)}, by round and by time' width='1100' height='280' "
            f"src='data:image/png;base64,{image}'><figcaption>Site <b>{e(a.site)}</b>: spent {_num(a.epsilon)} of "
            f"{'' if a.epsilon_budget is None else f'{a.epsilon_budget:g}'} (<span class='{cls}'>{e(status)}</span>)</figcaption></figure>"
        )
    return "".join(out)


def _panel_png(audit: SiteAudit, colour: str, top: float) -> bytes:
    """One site's panel: cumulative epsilon by round of each run (left) and by wall-clock time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(11, 2.8), dpi=100, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    status, _ = site_status(audit)
    budget = "-" if audit.epsilon_budget is None else f"{audit.epsilon_budget:.4g}"
    fig.suptitle(f"site {audit.site}: epsilon {_num(audit.epsilon, 3)} spent of budget {budget} ({status})", fontsize=10, x=0.01, ha="left")
    by_round.set_ylim(0, top)
    by_round.set_ylabel("cumulative epsilon")
    positions: dict[int, int] = {}
    if not audit.entries:
        for ax in (by_round, by_time):
            ax.text(0.5, 0.5, "no spends in this ledger", ha="center", va="center", transform=ax.transAxes)
    else:
        positions = _by_round(by_round, audit, colour)
        times = [datetime.fromisoformat(r["created"]) for r in audit.entries]
        by_time.plot(times, [r["epsilon"] for r in audit.entries], drawstyle="steps-post", color=colour, marker="o", markersize=4)
        by_time.plot(times, [r["epsilon_budget"] for r in audit.entries], drawstyle="steps-post", color="k", linestyle="--", linewidth=1)
        locator = mdates.AutoDateLocator(maxticks=6)
        by_time.xaxis.set_major_locator(locator)
        by_time.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        by_time.set_xlabel("wall-clock time of each spend (UTC)")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=20))
    by_round.xaxis.set_major_formatter(FuncFormatter(lambda x, _: str(positions.get(round(x), "")) if abs(x - round(x)) < 1e-6 else ""))
    for ax in (by_round, by_time):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _by_round(ax: Any, audit: SiteAudit, colour: str) -> dict[int, int]:
    """Each run's rounds side by side (a blank slot between runs); a segment per unbroken stretch of rounds."""
    offset, labelled = 0, False
    positions: dict[int, int] = {}
    for run in audit.run_details:
        rows = [r for r in audit.entries if r["run_id"] == run["run_id"]]
        xs = [offset + r["round"] for r in rows]
        positions.update({offset + r["round"]: r["round"] for r in rows})
        positions.update({offset + m: m for m in run["missing"]})
        start = 0
        for k in range(1, len(rows) + 1):
            if k == len(rows) or rows[k]["round"] != rows[k - 1]["round"] + 1:
                ax.plot(xs[start:k], [r["epsilon"] for r in rows[start:k]], color=colour, marker="o", markersize=4,
                        label=None if labelled else "spent (a marker per recorded round)")
                labelled = True
                start = k
        ax.step(xs, [r["epsilon_budget"] for r in rows], where="mid", color="k", linestyle="--", linewidth=1,
                label="budget" if offset == 0 else None)
        if any(not math.isclose(r["epsilon_stated"], r["epsilon_recomputed"], rel_tol=1e-6) for r in rows):
            carried = [r["epsilon"] - max(r["epsilon_stated"], r["epsilon_recomputed"]) for r in rows]
            ax.plot(xs, [c + min(r["epsilon_stated"], r["epsilon_recomputed"]) for c, r in zip(carried, rows)], color="grey",
                    linestyle=":", marker=".", linewidth=1, label="smaller of stated/recomputed (not counted)")
        for m in run["missing"]:
            ax.axvspan(offset + m - 0.5, offset + m + 0.5, color="#d62728", alpha=0.15, linewidth=0,
                       label="round missing from the ledger" if m == run["missing"][0] else None)
        ax.axvline(offset + 0.5, color="grey", linestyle=":", linewidth=0.8)
        ax.text(offset + 0.6, 0.97, f"run {run['run_id']}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="#444")
        offset += run["rounds"][-1] + 1
    ax.set_xlim(0.4, offset - 0.4)
    ax.set_xlabel("round of each run (runs in ledger order)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    return positions  # x position -> round number, for the tick labels
