"""The ``fedmm`` command.

- ``fedmm simulate [PRESET] [--set key=value ...]`` runs a federation offline and
  writes ``runs/<run-id>/``; it exits 0 only when the run completed;
- ``fedmm data check MANIFEST [--lenient]`` validates a manifest and prints counts per
  modality, class and site (exit 1 on a strict failure);
- ``fedmm data split [PRESET] [--set ...]`` shows how a simulated federation splits
  the data (per-site counts per class and modality);
- ``fedmm plan [PRESET] [--set ...]`` prints each site's DP plan: sample rate, steps,
  the noise multiplier chosen for the budget, and the rounds each site's own budget allows;
- ``fedmm server --pki DIR`` and ``fedmm site SITE.toml`` run a deployment: Flower's
  SuperLink and one SuperNode per site, with TLS and SuperNode authentication (docs/deploy.md);
- ``fedmm audit LEDGER... [--json] [--html FILE]`` checks site privacy ledgers: spend
  against budget, runs, last spend, hash chain (exit 1 on a broken chain or a spend over
  budget).
- ``fedmm certs init|site|show`` makes a private CA, the SuperLink's TLS certificate
  and the sites' SuperNode keys, and lists them with expiry (see docs/transport.md).

Exit codes: 0 success, 1 failed run or bad data, 2 bad configuration.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tomllib
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from fedmm.federation.artifacts import new_run_id
from fedmm.config import RunConfig
from fedmm.errors import ConfigError, FedMMError
from fedmm.secure.certs_cli import certs_app

if TYPE_CHECKING:
    from fedmm.plan import RunPlan

__all__ = ["app", "main", "parse_overrides"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fedmm: private multimodal federated learning.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Check data and inspect simulated federations.")
app.add_typer(data_app, name="data")
app.add_typer(certs_app, name="certs")
console = Console()
_MARK = "[fedmm] "


@app.callback()
def _root() -> None:
    """fedmm: private multimodal federated learning on Flower and Opacus."""


@contextlib.contextmanager
def _exit_on_error() -> Iterator[None]:
    """Print a fedmm error and exit: 2 for configuration, 1 for data and anything else."""
    try:
        yield
    except ConfigError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    except FedMMError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` pairs; values are TOML literals, else plain strings.

    >>> parse_overrides(["dp=false", "rounds=3", "data=avmnist:/data", "target-epsilon=4"])
    {'dp': False, 'rounds': 3, 'data': 'avmnist:/data', 'target-epsilon': 4}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(pair, "is not of the form key=value", fix="e.g. --set rounds=3")
        try:
            out[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip()
    return out


def _load_preset(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError("PRESET", f"preset file {path} not found", fix="give a TOML file such as simulations/avmnist-dp.toml")
    try:
        return dict(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("PRESET", f"{path} is not valid TOML ({err})", fix="correct the file") from err


def _print_summary(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())["sites"]
    table = Table(title=f"fedmm run {summary['run_id']} (q: sample rate, noise: noise multiplier)", show_edge=False)  # 80 columns
    for column in ("site", "epsilon", "budget", "delta", "acct", "noise", "q", "steps", "status"):
        table.add_column(column, overflow="fold", no_wrap=column == "site")
    for site in privacy:
        budget = site.get("epsilon_budget")
        table.add_row(
            site["site"], f"{site['epsilon']:.3f}", "" if budget is None else f"{budget:g}", f"{site['delta']:g}", site["accountant"],
            f"{site['noise_multiplier']:.3f}", f"{site['sample_rate']:.4f}", str(site["steps"]),
            "stopped" if site.get("refused") else "trained",
        )
    if privacy:
        console.print(table)
    eps = summary["max_epsilon"]
    privacy_text = f"max epsilon {eps:.3f} at delta {summary['delta']:g} ({summary['accountant']})" if eps is not None else "no sample-level DP"
    if summary.get("client_epsilon") is not None:
        privacy_text += f", client-level epsilon {summary['client_epsilon']:.3f} at delta {summary['client_delta']:g} (rdp)"
    if summary.get("secure_aggregation"):
        privacy_text += ", secure aggregation (SecAgg+)"
    if summary.get("rejected_updates"):
        console.print(f"[yellow]updates rejected:[/yellow] {summary['rejected_updates']}")
    if summary.get("stopped"):
        console.print(f"[yellow]stopped early:[/yellow] {summary['stopped']}")
    for site in privacy:
        if site.get("refused"):
            console.print(f"{site['site']}: {site['refused']}", markup=False, highlight=False)
    console.print(
        f"[bold]final accuracy {summary['final_accuracy']:.4f}[/bold] after {summary['rounds']} rounds, "
        f"{summary['sites']} sites, {privacy_text}; {summary['wall_seconds']:.0f} s in the ServerApp\n"
        f"artifacts: {run_dir}"
    )


@app.command()
def simulate(
    preset: Annotated[Path | None, typer.Argument(help="TOML file of run-config keys (see simulations/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a run-config key: --set rounds=3")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower's whole log")] = False,
) -> None:
    """Run a federated simulation offline and write runs/<run-id>/."""
    from fedmm.runtime.simulation import run_simulation  # imported late: keeps `fedmm --help` fast

    with _exit_on_error():
        values = {**_load_preset(preset), **parse_overrides(set_ or [])}
        cfg = RunConfig.from_run_config(values)
        cfg = cfg.replace(
            run_name=cfg.run_name or new_run_id(), data=_absolute_data(cfg.data),
            image_weights=str(Path(cfg.image_weights).expanduser().resolve()) if cfg.image_weights else "",
        )
        run_plan = _run_plan(cfg)
        federation = _federation(run_plan)  # bad data or a bad split fails here, before Flower starts
    if len(federation.names) != cfg.sites:
        console.print(f"[red]error:[/red] the federation has {len(federation.names)} sites, sites={cfg.sites}. Fix: set sites={len(federation.names)}")
        raise typer.Exit(2)
    if federation.skipped:
        console.print(f"lenient: skipped {federation.skipped} (see `fedmm data check`)")
    console.print(f"fedmm: simulating {cfg.sites} sites x {cfg.rounds} rounds, dp={cfg.dp}, data={cfg.data} (run {cfg.run_name})")
    if cfg.dp:
        with _exit_on_error():
            console.print(_plan_table(run_plan, federation))

    shown: set[str] = set()

    def on_line(line: str) -> None:
        if verbose:
            console.print(line, markup=False, highlight=False)
        elif _MARK in line:
            text = line.split(_MARK, 1)[1]
            if text not in shown:  # Flower's log stream can repeat a line
                shown.add(text)
                console.print(text, markup=False, highlight=False, soft_wrap=True)

    try:
        outcome = run_simulation(cfg, on_line=on_line)
    except FedMMError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err
    if not outcome.ok:
        console.print(f"[red]run failed[/red] ({outcome.status}): {outcome.details}")
        tail = outcome.log_file.read_text(errors="replace").splitlines()[-30:] if outcome.log_file.is_file() else []
        console.print("\n".join(tail), markup=False, highlight=False)
        console.print(f"full log: {outcome.log_file}")
        raise typer.Exit(1)
    _print_summary(outcome.run_dir)


def _run_plan(cfg: RunConfig) -> RunPlan:
    """The run's parts, every key checked (imported late: data and model libraries are slow to load)."""
    from fedmm.plan import RunPlan

    return RunPlan.from_config(cfg)


def _absolute_data(spec: str) -> str:
    """Make a relative data path absolute: Flower's processes do not share this working folder.

    >>> _absolute_data("avmnist"), _absolute_data("synthetic:100"), _absolute_data("manifest:/srv/m.csv")
    ('avmnist', 'synthetic:100', 'manifest:/srv/m.csv')
    """
    name, sep, location = spec.partition(":")
    if not sep or name == "synthetic" or not location:
        return spec
    return f"{name}:{Path(location).expanduser().resolve()}"


def _federation(run_plan: RunPlan) -> Any:
    """Load and split the data as the sites will, and check the model and augmentation fit it."""
    from fedmm.data.augment import Augmenter
    from fedmm.data.partition import build_federation
    from fedmm.data.sources import load_source
    from fedmm.site.data import class_weights

    cfg, recipe = run_plan.config, run_plan.model
    source = load_source(cfg.data, run_plan.preprocessing, classes=cfg.class_list, lenient=cfg.lenient, test_fraction=cfg.test_fraction)
    federation = build_federation(source, run_plan.federation)
    test = recipe.prepare(source.require_test(), tasks_from=recipe.task_classes(source.require_test()))
    Augmenter(test.schema, run_plan.augment, seed=0)
    class_weights(cfg, test)
    if cfg.dp:
        recipe.check_grad_sample_mode(cfg.grad_sample_mode.value, test.schema)
    return federation


def _counts_table(title: str, rows: dict[str, dict[str, Any]], classes: tuple[str, ...], modalities: tuple[str, ...]) -> Table:
    """One column per site (or group), one row per count: narrow enough for a terminal."""
    table = Table(title=title)
    table.add_column("")
    for name in rows:
        table.add_column(name, justify="right")
    counts = list(rows.values())
    table.add_row("samples", *(str(c["samples"]) for c in counts), style="bold")
    for m in modalities:
        table.add_row(f"with {m}", *(str(c["per_modality"][m]) for c in counts))
    for k in classes:
        table.add_row(f"class {k}", *(str(c["per_class"][k]) for c in counts), style="cyan")
    if any(c["unlabelled"] for c in counts):
        table.add_row("unlabelled", *(str(c["unlabelled"]) for c in counts))
    return table


@data_app.command("check")
def data_check(
    manifest: Annotated[Path, typer.Argument(help="a .csv or .parquet manifest")],
    lenient: Annotated[bool, typer.Option("--lenient", help="skip bad rows (counted per reason) instead of stopping at the first")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="a preprocessing key: --set image-size=64")] = None,
) -> None:
    """Validate a manifest: load every row as training would; print counts per modality, class and site."""
    from fedmm.data.manifest import load_manifest

    with _exit_on_error():
        run_plan = _run_plan(RunConfig.from_run_config(parse_overrides(set_ or [])))
        cfg = run_plan.config
        ds = load_manifest(manifest, run_plan.preprocessing, classes=cfg.class_list, lenient=lenient)
    schema = ds.schema
    mods = Table(title=f"{manifest}: {len(ds)} samples")
    for column in ("modality", "kind", "shape", "present", "missing"):
        mods.add_column(column)
    counts = ds.counts()
    for m in schema.modalities:
        present = counts["per_modality"][m.name]
        mods.add_row(m.name, str(m.kind), "x".join(map(str, m.shape)), str(present), str(len(ds) - present))
    console.print(mods)
    groups = {"all": counts}
    for column in ("site", "split"):
        if column in ds.groups:
            for value in sorted(set(ds.groups[column].tolist())):
                groups[f"{column}={value or '(empty)'}"] = ds.subset(np.flatnonzero(ds.groups[column] == value)).counts()
    console.print(_counts_table("samples per class", groups, schema.classes, schema.names))
    if ds.skipped:
        skips = Table(title=f"skipped rows: {sum(ds.skipped.values())}")
        skips.add_column("reason")
        skips.add_column("rows", justify="right")
        for reason, n in sorted(ds.skipped.items()):
            skips.add_row(reason, str(n))
        console.print(skips)
    console.print(f"[green]ok[/green]: {len(ds)} samples usable" + (f", {sum(ds.skipped.values())} skipped" if ds.skipped else ""))


@data_app.command("split")
def data_split(
    preset: Annotated[Path | None, typer.Argument(help="TOML file of run-config keys (see simulations/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a run-config key: --set partitioner=dirichlet")] = None,
) -> None:
    """Show how the configured simulated federation splits the data across sites."""
    with _exit_on_error():
        cfg = RunConfig.from_run_config({**_load_preset(preset), **parse_overrides(set_ or [])})
        federation = _federation(_run_plan(cfg))
    summary = federation.summary()
    schema = federation.sites[0].schema
    title = f"{cfg.data}: {federation.partitioner} partition into {len(federation.names)} sites (seed {cfg.seed})"
    if summary["synthetic"]:
        title += " - SYNTHETIC data"
    console.print(_counts_table(title, summary["sites"], schema.classes, schema.names))
    if federation.unassigned:
        console.print(f"{federation.unassigned} samples of the pool are held by no site ({federation.partitioner} partition)")
    for name, note in zip(federation.names, federation.notes):
        extra = {k: v for k, v in note.items() if k != "transition_matrix"}
        if extra:
            console.print(f"{name}: {extra}")


def _plan_table(run_plan: RunPlan, federation: Any) -> Table:
    """Per site: records, sample rate, steps, the noise for the run's target, and what its own budget allows."""
    import warnings

    cfg, budgets, recipe = run_plan.config, run_plan.site_budgets, run_plan.model
    table = Table(title=f"DP plan: target epsilon {cfg.target_epsilon:g} at delta {cfg.target_delta:g} ({cfg.accountant}) over {cfg.rounds} rounds; q: sample rate, noise: noise multiplier")
    for column in ("site", "records", "q", "steps/rd", "noise", "epsilon", "budget", "rounds"):
        table.add_column(column, overflow="fold")
    for name, ds in zip(federation.names, federation.sites):
        with warnings.catch_warnings():
            # Opacus notes when RDP's best order is its largest (a looser bound, still valid); the table names the accountant.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            table.add_row(*_plan_row(cfg, name, len(recipe.prepare(ds).labelled()), budgets.get(name, budgets["*"])))
    return table


def _plan_row(cfg: RunConfig, name: str, records: int, budget: float) -> list[str]:
    from fedmm.privacy.accounting import SiteAccountant
    from fedmm.site.round import plan_site

    plan = plan_site(cfg, records)
    accountant, affordable = SiteAccountant(cfg.accountant), 0
    while affordable < cfg.rounds:
        accountant.record(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps_per_round)
        if accountant.epsilon(cfg.target_delta) > budget:
            break
        affordable += 1
    floor = " (below the sites' floor)" if plan.noise_multiplier < cfg.site_min_noise_multiplier else ""
    return [
        name, str(records), f"{plan.sample_rate:.4f}", str(plan.steps_per_round), f"{plan.noise_multiplier:.4f}{floor}",
        f"{plan.planned_epsilon:.3f}", f"{budget:g}", str(affordable) if affordable < cfg.rounds else f"all {cfg.rounds}",
    ]


@app.command()
def plan(
    preset: Annotated[Path | None, typer.Argument(help="TOML file of run-config keys (see simulations/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a run-config key: --set rounds=3")] = None,
) -> None:
    """Print each site's DP plan (noise chosen up front for the budget, rounds, local epochs) without training."""
    with _exit_on_error():
        cfg = RunConfig.from_run_config({**_load_preset(preset), **parse_overrides(set_ or [])})
        cfg = cfg.replace(data=_absolute_data(cfg.data))
        run_plan = _run_plan(cfg)
        if cfg.client_dp:
            console.print(_client_level_line(cfg))
        if not cfg.dp:
            console.print("dp=false: no sample-level privacy plan (the sites' records are not protected by DP-SGD)")
            return
        console.print(_plan_table(run_plan, _federation(run_plan)))


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


@app.command()
def server(
    pki: Annotated[Path, typer.Option(help="folder made by 'fedmm certs init': ca.crt, server.crt, server.key")],
    state_dir: Annotated[Path, typer.Option(help="where the SuperLink keeps its database (registered sites, runs)")] = Path("fedmm-server"),
    host: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="the SuperLink's port (Fleet, Control and Runtime APIs)")] = 9092,
    in_memory: Annotated[bool, typer.Option(
        "--in-memory", help="keep the SuperLink's state in memory, not its database: rounds about 2.5x faster, "
        "but a restarted server has forgotten its registered sites and runs (see docs/deploy.md, Latency)",
    )] = False,
) -> None:
    """Run the federation's server: Flower's SuperLink with TLS, SuperNode authentication, no runtime installs."""
    from fedmm.runtime.deploy import run_server

    with _exit_on_error():
        raise typer.Exit(run_server(pki, state_dir, host=host, port=port, in_memory=in_memory))


@app.command()
def site(config: Annotated[Path, typer.Argument(help="the site's own TOML file ([site] table, see docs/deploy.md)")]) -> None:
    """Run one data site: its SuperNode (TLS, its registered key, its own budget and data) and its long-lived ClientApp executor."""
    from fedmm.runtime.deploy import SiteSettings, run_site

    with _exit_on_error():
        raise typer.Exit(run_site(SiteSettings.load(config)))


@app.command()
def audit(
    ledgers: Annotated[list[Path], typer.Argument(help="site ledgers (ledger.sqlite), or folders to search for them")],
    as_json: Annotated[bool, typer.Option("--json", help="print the audit as JSON: every entry and its recomputed epsilon")] = False,
    html_file: Annotated[Path | None, typer.Option("--html", help="also write an HTML report with a plot of epsilon over spends")] = None,
) -> None:
    """Check site privacy ledgers: spend against budget, runs, last spend, and the hash chain.

    Exit 0 when every ledger is intact and within budget, 1 otherwise, 2 when no ledger is found.
    """
    from fedmm.privacy.audit import audit_ledger, render_html
    from fedmm.privacy.ledger import find_ledgers

    with _exit_on_error():
        paths = find_ledgers(ledgers)
        if not paths:
            raise ConfigError("LEDGER", "no ledger.sqlite found", value=[str(p) for p in ledgers], fix="give a site's ledger file or its state directory")
        audits = [audit_ledger(p) for p in paths]
    ok = all(a.ok for a in audits)
    if html_file is not None:
        html_file.write_text(render_html(audits), encoding="utf-8")
    if as_json:
        print(json.dumps({"ok": ok, "sites": [a.to_json() for a in audits]}, indent=2))
    else:
        table = Table(title="fedmm privacy audit (epsilon recomputed from each ledger's events)")
        for column in ("site", "epsilon", "budget", "remaining", "delta", "accountant", "runs", "spends", "last spend (UTC)", "hash chain"):
            table.add_column(column)
        for a in audits:
            table.add_row(
                a.site, f"{a.epsilon:.4f}", "" if a.epsilon_budget is None else f"{a.epsilon_budget:g}",
                "" if a.remaining is None else f"{a.remaining:.4f}", "" if a.delta is None else f"{a.delta:g}", a.accountant or "",
                str(a.runs), str(len(a.entries)), (a.last_spend or "")[:19], "[green]intact[/green]" if a.chain_ok else "[red]BROKEN[/red]",
            )
        console.print(table)
        for a in audits:
            for problem in a.problems:
                console.print(f"[red]{a.site}:[/red] {problem}  ({a.path})")
        console.print("[green]every ledger intact and within budget[/green]" if ok else "[red]audit failed[/red]")
        if html_file is not None:
            console.print(f"HTML report: {html_file}")
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``fedmm`` console script."""
    sys.exit(app())
