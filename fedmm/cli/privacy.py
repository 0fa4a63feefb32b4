"""``fedmm plan`` and ``fedmm audit``: privacy before a run (each site's plan) and after (its ledger)."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from fedmm.cli.common import absolute_data, app, console, exit_on_error, build_plan, federation_usage, load_federation, load_preset, parse_overrides
from fedmm.cli.tables import FitTable
from fedmm.config import RunConfig
from fedmm.errors import ConfigError

if TYPE_CHECKING:
    from fedmm.plan import RunPlan

__all__ = ["plan", "audit", "plan_table"]


def plan_table(run_plan: RunPlan, federation: Any, *, warn_studies: bool = True) -> FitTable:
    """Per site: records, sample rate, steps, the noise for the run's target, what its own budget allows of this run and in studies.

    ``warn_studies=False`` leaves out the warning for a site whose lifetime budget fits fewer than
    two studies (``fedmm simulate`` without a lasting ``site-state-dir``: its sites' ledgers begin
    empty every run, so a second study is never charged to the same ledger)."""
    import warnings

    cfg, budgets, recipe = run_plan.config, run_plan.site_budgets, run_plan.model
    table = FitTable(
        f"DP plan: target epsilon {cfg.target_epsilon:g} at delta {cfg.target_delta:g} ({cfg.accountant}) over {cfg.rounds} rounds; "
        "q: sample rate, noise: noise multiplier, budget: the site's lifetime epsilon, rounds: of this run its budget still allows, "
        "studies: whole runs of this plan it still allows",
        ("site", "records", "q", "steps/rd", "noise", "epsilon", "budget", "rounds", "studies"),
    )
    for index, (name, ds) in enumerate(zip(federation.names, federation.sites)):
        # prepare() checks that the model takes the data (the federation's one schema: once is enough) and keeps
        # every sample and label, so the other sites' records are counted without computing their features.
        records = len((recipe.prepare(ds) if index == 0 else ds).labelled())
        with warnings.catch_warnings():
            # Opacus notes when RDP's best order is its largest (a looser bound, still valid); the table names the accountant.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            row, warning = _plan_row(cfg, name, records, budgets.get(name, budgets["*"]))
        table.add_row(*row)
        if warning and warn_studies:
            table.notes.append(Text(warning, style="yellow"))
    return table


def _plan_row(cfg: RunConfig, name: str, records: int, budget: float) -> tuple[list[str], str | None]:
    from fedmm.cli.studies import spent_before, studies_allowed
    from fedmm.privacy.accounting import SiteAccountant
    from fedmm.site.round import plan_site

    plan = plan_site(cfg, records)
    # Rounds of this run the site's budget allows after what its lasting ledger (site-state-dir) already holds.
    history, carried = spent_before(cfg, name)
    accountant, affordable = SiteAccountant(cfg.accountant, history), 0
    if plan.stats_noise_multiplier > 0:  # the site's statistics release, before its first round
        accountant.record(noise_multiplier=plan.stats_noise_multiplier, sample_rate=1.0, steps=1)
    while affordable < cfg.rounds:
        accountant.record(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps_per_round)
        if carried + accountant.epsilon(cfg.target_delta) > budget:
            break
        affordable += 1
    floor = " (below the sites' floor)" if plan.noise_multiplier < cfg.site_min_noise_multiplier else ""
    studies = studies_allowed(cfg, plan, budget, history=history, carried=carried)
    warning = None
    if studies.spent and affordable < cfg.rounds:
        warning = (f"warning: site {name} has already spent epsilon {studies.spent:.3f} of its lifetime budget {budget:g} (its ledger under "
                   f"site-state-dir): it can take part in {affordable} of this run's {cfg.rounds} rounds")
    elif studies.count < 2:
        spent = f", {studies.spent:.3f} of it already spent," if studies.spent else ""
        warning = (f"warning: site {name}'s lifetime budget epsilon {budget:g}{spent} fits {studies.count} whole "
                   f"{'study' if studies.count == 1 else 'studies'} of this plan: raise its budget, or plan a smaller target-epsilon a study")
    return [
        name, str(records), f"{plan.sample_rate:.4f}", str(plan.steps_per_round), f"{plan.noise_multiplier:.4f}{floor}",
        f"{plan.planned_epsilon:.3f}", f"{budget:g}", str(affordable) if affordable < cfg.rounds else f"all {cfg.rounds}", studies.text,
    ], warning


@app.command()
def plan(
    preset: Annotated[Path | None, typer.Argument(help="TOML file of run-config keys (see simulations/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a run-config key: --set rounds=3")] = None,
) -> None:
    """Print each site's DP plan (noise chosen up front for the budget, rounds, local epochs) without training."""
    with exit_on_error():
        cfg = RunConfig.from_run_config({**load_preset(preset), **parse_overrides(set_ or [])})
        cfg = cfg.replace(data=absolute_data(cfg.data))
        run_plan = build_plan(cfg)
        federation = load_federation(run_plan) if cfg.dp or cfg.sites is None else None
        if federation is not None and cfg.sites is None:  # sites=auto: every natural group
            run_plan = run_plan.with_sites(len(federation.names))
            cfg = run_plan.config
        if cfg.client_dp:
            console.print(_client_level_line(cfg))
        if run_plan.client_dp is not None and run_plan.client_dp.share is not None:
            console.print(_share_line(run_plan.client_dp.share), markup=False, highlight=False)
        if not cfg.dp:
            console.print("dp=false: no sample-level privacy plan (the sites' records are not protected by DP-SGD)")
            return
        assert federation is not None
        console.print(federation_usage(federation), markup=False, highlight=False)
        console.print(plan_table(run_plan, federation))


def _client_level_line(cfg: RunConfig) -> str:
    """Client-level (DP-FedAvg) epsilon after all rounds, and the rounds client-target-epsilon allows."""
    from fedmm.privacy.client_dp import ClientAccountant

    acct = ClientAccountant(noise_multiplier=cfg.client_noise_multiplier, sample_rate=cfg.client_fraction)
    allowed = None
    for r in range(1, cfg.rounds + 1):
        acct.record_round()
        if allowed is None and cfg.client_target_epsilon and acct.epsilon(cfg.client_delta) > cfg.client_target_epsilon:
            allowed = r - 1
    line = (
        f"client-level DP ({cfg.client_noise} noise): clip {cfg.client_clip_norm:g}, noise multiplier {cfg.client_noise_multiplier:g}, "
        f"sites sampled at {cfg.client_fraction:g}: epsilon {acct.epsilon(cfg.client_delta):.3f} at delta {cfg.client_delta:g} (rdp) after {cfg.rounds} rounds"
    )
    if allowed is not None:
        line += f"; client-target-epsilon={cfg.client_target_epsilon:g} allows {allowed} rounds"
    return line


def _share_line(share: Any) -> str:
    """Distributed noise against secagg-clip-range (:class:`fedmm.privacy.client_dp.ShareCheck`): the check the plan passed."""
    from fedmm.privacy.client_dp import SHARE_TRUNCATION_Z, share_truncation_probability

    return (
        f"distributed noise share: std up to {share.std:.4g} (for {share.parties} parties: the smallest SecAgg+ threshold of a round that can be unmasked); "
        f"needs secagg-clip-range >= client-clip-norm + {SHARE_TRUNCATION_Z:g} x std = {share.bound:.4g} "
        f"(a value clipped with probability < {share_truncation_probability():.1e}); secagg-clip-range {share.clip_range:g}: "
        + ("ok" if share.ok else "TOO SMALL")
    )


@app.command()
def audit(
    ledgers: Annotated[list[Path], typer.Argument(help="site ledgers (ledger.sqlite), or folders to search for them")],
    as_json: Annotated[bool, typer.Option("--json", help="print the audit as JSON: every entry and its recomputed epsilon")] = False,
    html_file: Annotated[Path | None, typer.Option("--html", help="also write an offline HTML report: warnings, per-site and per-run tables, a panel per site")] = None,
    witness: Annotated[list[Path] | None, typer.Option(
        "--witness", help="a run's privacy.json (the server's record of each site's ledger head): every site it names must match",
    )] = None,
    given_only: Annotated[bool, typer.Option(
        "--given-only", help="with --witness: check only the sites whose ledgers are given (a site auditing its own ledger), "
        "not fail for the other sites the witness names",
    )] = False,
) -> None:
    """Check site privacy ledgers (read-only): spend against budget, runs, last spend, the hash chain, and witnesses.

    Exit 0 when every ledger is intact, within budget and agrees with every witness; 1 otherwise;
    2 when no ledger is found.
    """
    from fedmm.privacy.audit import audit_ledger, load_witness
    from fedmm.privacy.audit_report import render_html
    from fedmm.privacy.ledger import find_ledgers

    with exit_on_error():
        paths = find_ledgers(ledgers)
        if not paths:
            raise ConfigError("LEDGER", "no ledger.sqlite found", value=[str(p) for p in ledgers], fix="give a site's ledger file or its state directory")
        witnesses = {str(w): load_witness(w) for w in witness or []}
        audits = [audit_ledger(p, witnesses=witnesses) for p in paths]
    audited = {a.site for a in audits}
    for source, heads in witnesses.items():
        for missing in [] if given_only else sorted(set(heads) - audited):
            audits.append(dataclasses.replace(
                audit_ledger(Path(f"(no ledger given for site {missing})")), site=missing, path="",
                problems=[f"the witness {source} names site {missing!r}, whose ledger was not given. Fix: give every site's ledger (or "
                          "state directory), or --given-only to check only the sites given"],
            ))
    ok = all(a.ok for a in audits)
    if html_file is not None:
        html_file.write_text(render_html(audits, witnesses=[str(w) for w in witness or []]), encoding="utf-8")
    if as_json:
        print(json.dumps({"ok": ok, "sites": [a.to_json() for a in audits]}, indent=2))
    else:
        table = FitTable(
            "fedmm privacy audit (epsilon recomputed from each ledger's events)",
            ("site", "epsilon", "budget", "remaining", "delta", "accountant", "runs", "spends", "last spend (UTC)", "hash chain",
             *(("witness",) if witnesses else ())),
        )
        named = {None: Text("not named"), True: Text("matches", "green"), False: Text("DIFFERS", "red")}
        named_sites = {site for heads in witnesses.values() for site in heads}
        for a in audits:
            table.add_row(
                a.site, f"{a.epsilon:.4f}", "" if a.epsilon_budget is None else f"{a.epsilon_budget:g}",
                "" if a.remaining is None else f"{a.remaining:.4f}", "" if a.delta is None else f"{a.delta:g}", a.accountant or "",
                str(a.runs), str(len(a.entries)), (a.last_spend or "")[:19], Text("intact", "green") if a.chain_ok else Text("BROKEN", "red"),
                *((named[a.witness_ok] if a.path and (a.witness_ok is not None or a.site not in named_sites) else Text("no ledger", "red"),)
                  if witnesses else ()),
            )
        console.print(table)
        for a in audits:
            for problem in a.problems:
                console.print(Text.assemble((f"{a.site}:", "red"), f" {problem}" + (f"  ({a.path})" if a.path else "")))
            for note in a.notes:
                console.print(Text.assemble((f"{a.site}:", "yellow"), f" {note}"))
        if ok and witnesses:
            console.print(f"[green]every ledger head matches {', '.join(witnesses)} where it names the site[/green]", highlight=False)
        console.print("[green]every ledger intact and within budget[/green]" if ok else "[red]audit failed[/red]")
        if html_file is not None:
            console.print(f"HTML report: {html_file}", markup=False, highlight=False)
    if not ok:
        raise typer.Exit(1)
