"""``fedmm simulate``, ``fedmm server`` and ``fedmm site``: the commands that run a federation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedmm.cli.common import absolute_data, app, console, exit_on_error, build_plan, federation_usage, load_federation, load_preset, parse_overrides
from fedmm.config import RunConfig
from fedmm.errors import FedMMError
from fedmm.federation.artifacts import check_run_folder, new_run_id, resume_advice

__all__ = ["simulate", "server", "site"]

_MARK = "[fedmm] "
_PLAN_ROWS = 50  # above this many sites `fedmm simulate` prints one line for the DP plan, not a row per site


def _print_summary(run_dir: Path) -> str:
    """Print a finished run's privacy table and summary; return its status (completed, stopped or failed)."""
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
    if eps is not None:
        privacy_text = f"max epsilon {eps:.3f} at delta {summary['delta']:g} ({summary['accountant']})"
    else:  # with dp=true every report received is in privacy.json: none means no site trained
        privacy_text = "sample-level DP, but no site trained (no budget spent)" if summary.get("dp") else "no sample-level DP"
    if summary.get("client_epsilon") is not None:
        privacy_text += f", client-level epsilon {summary['client_epsilon']:.3f} at delta {summary['client_delta']:g} (rdp)"
    if summary.get("secure_aggregation"):
        privacy_text += ", secure aggregation (SecAgg+)"
    if summary.get("rejected_updates"):
        console.print(f"[yellow]updates rejected:[/yellow] {summary['rejected_updates']}")
    status = str(summary.get("status") or ("stopped" if summary.get("stopped") else "completed"))
    if summary.get("stopped"):
        console.print(f"[yellow]{'failed, nothing trained' if status == 'failed' else 'stopped early'}:[/yellow] {summary['stopped']}")
    for site in privacy:
        if site.get("refused"):
            console.print(f"{site['site']}: {site['refused']}", markup=False, highlight=False)
    console.print(
        f"[bold]final accuracy {summary['final_accuracy']:.4f}[/bold] after {summary['rounds']} rounds, "
        f"{summary['sites']} sites, {privacy_text}; {summary['wall_seconds']:.0f} s in the ServerApp\n"
        f"artifacts: {run_dir}"
    )
    colour = {"completed": "green", "stopped": "yellow"}.get(status, "red")
    console.print(f"status: [{colour}]{status}[/{colour}] ({summary['rounds']} of {summary.get('rounds_planned', '?')} rounds)")
    return status


@app.command()
def simulate(
    preset: Annotated[Path | None, typer.Argument(help="TOML file of run-config keys (see simulations/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a run-config key: --set rounds=3")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower's whole log")] = False,
    superlink: Annotated[bool, typer.Option(
        "--superlink", help="run through a private SuperLink and `flwr run` (as `flwr run .` does), not Flower's engine in this "
        "process: the same App and results, more start-up (see docs/benchmarks.md, Scaling)",
    )] = False,
    use_ray: Annotated[bool, typer.Option(
        "--ray", help="run the sites in Flower's Ray workers, one CPU each, several at a time (default: one at a time in this "
        "process, which starts in seconds; Ray pays off when a round's training outweighs its workers' 10-20 s start)",
    )] = False,
    ray_address: Annotated[str, typer.Option(
        "--ray-address", help="attach to a running Ray cluster: the head's HOST:PORT, or 'auto'; run this on a node of the cluster "
        "(implies --superlink; default: a private Ray for this run; see docs/runs.md, Running on a Ray cluster)",
    )] = "",
    site_cpus: Annotated[int, typer.Option("--site-cpus", help="Ray CPUs for each site (whole CPUs; implies --superlink if not 1)")] = 1,
    site_gpus: Annotated[float, typer.Option("--site-gpus", help="Ray GPUs for each site, e.g. 0.5: two sites share a GPU (implies --superlink if set)")] = 0.0,
) -> None:
    """Run a federated simulation offline and write runs/<run-id>/."""
    from fedmm.runtime.ray_cluster import RaySettings

    with exit_on_error():
        ray = RaySettings(address=ray_address, site_cpus=site_cpus, site_gpus=site_gpus)  # checked before any data is read
        values = {**load_preset(preset), **parse_overrides(set_ or [])}
        cfg = RunConfig.from_run_config(values)
        cfg = cfg.replace(
            run_name=cfg.run_name or new_run_id(), data=absolute_data(cfg.data),
            image_weights=str(Path(cfg.image_weights).expanduser().resolve()) if cfg.image_weights else "",
        )
        resumed_after = check_run_folder(cfg.runs_dir, cfg.run_name, resume=cfg.resume, rounds=cfg.rounds)  # before anything is loaded or started
        run_plan = build_plan(cfg)
        federation = load_federation(run_plan)  # bad data or a bad split fails here, before Flower starts
    if cfg.sites is None:  # auto: every group of a natural partition (else the default count)
        with exit_on_error():
            run_plan = run_plan.with_sites(len(federation.names))
            cfg = run_plan.config
    if len(federation.names) != cfg.sites:
        console.print(f"[red]error:[/red] the federation has {len(federation.names)} sites, sites={cfg.sites}. Fix: set sites={len(federation.names)}")
        raise typer.Exit(2)
    if federation.skipped:
        console.print(f"lenient: skipped {federation.skipped} (see `fedmm data check`)")
    console.print(f"fedmm: simulating {cfg.sites} sites x {cfg.rounds} rounds, dp={cfg.dp}, data={cfg.data} (run {cfg.run_name})")
    console.print(federation_usage(federation), markup=False, highlight=False)
    if cfg.dp and len(federation.names) > _PLAN_ROWS:  # a table of thousands of rows is read by nobody, and costs minutes
        console.print(
            f"DP plan: each of the {len(federation.names)} sites fixes its noise for target epsilon {cfg.target_epsilon:g} at delta "
            f"{cfg.target_delta:g} ({cfg.accountant}) over {cfg.rounds} rounds and refuses a round past its budget; "
            "`fedmm plan` with the same settings prints every site's plan", markup=False, highlight=False,
        )
    elif cfg.dp:
        with exit_on_error():
            from fedmm.cli.privacy import plan_table  # a sibling module: commands register in help order

            if cfg.resume:
                console.print(f"resuming after round {resumed_after}: the plan below is this configuration's from round 1; the rounds run so "
                              "far spent as they ran (each site's ledger), and each site's budget check counts them", highlight=False)
            console.print(plan_table(run_plan, federation, warn_studies=bool(cfg.site_state_dir)))

    shown: set[str] = set()

    def on_line(line: str) -> None:  # the console survives its reader going away (`fedmm simulate | head`): fedmm.cli.common
        if verbose:
            console.print(line, markup=False, highlight=False)
        elif _MARK in line:
            text = line.split(_MARK, 1)[1].strip()
            if text not in shown:  # Flower's log stream can repeat a line
                shown.add(text)
                console.print(text, markup=False, highlight=False, soft_wrap=True)

    try:
        if superlink or ray != RaySettings():  # a Ray cluster or other site resources: through Flower's SuperLink, as `flwr run`
            from fedmm.runtime.simulation import run_simulation  # imported late: keeps `fedmm --help` fast

            outcome = run_simulation(cfg, on_line=on_line, ray=ray)
        else:  # Flower's engine in this process: the data loaded and checked above is not loaded again
            from fedmm.runtime.embedded import run_embedded

            outcome = run_embedded(cfg, on_line=on_line, verbose=verbose, ray=use_ray)
    except FedMMError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err
    if outcome.status == "finished:interrupted":
        code = _report_interrupted(outcome.run_dir, outcome.log_file, cfg.site_state_dir)
        # Everything of the run is on disk (each spend was committed before its update left), Flower's engine
        # and any Ray process are stopped and the private folder is gone. What an interrupted engine leaves
        # running in native code can abort the interpreter's own shutdown, so the process ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if not outcome.ok:
        console.print(f"[red]run failed[/red] ({outcome.status}): {outcome.details}")
        summary_file = outcome.run_dir / "summary.json"
        if summary_file.is_file():  # a run that trained no round writes its summary, then fails
            summary = json.loads(summary_file.read_text())
            console.print(f"status: [red]{summary.get('status', 'failed')}[/red]: {summary.get('stopped') or outcome.details}", highlight=False)
        tail = outcome.log_file.read_text(errors="replace").splitlines()[-30:] if outcome.log_file.is_file() else []
        console.print("\n".join(tail), markup=False, highlight=False)
        console.print(f"full log: {outcome.log_file}")
        _print_spends(outcome.run_dir, "privacy spent before the failure", cfg.site_state_dir)  # on record: say so
        raise typer.Exit(1)
    if _print_summary(outcome.run_dir) == "failed":  # Flower said completed, the run's own summary says otherwise
        raise typer.Exit(1)


def _print_spends(run_dir: Path, heading: str, state_dir: str = "") -> None:
    """What each site spent in this run: from the sites' own ledgers (the authority: a site records its spend before its
    update leaves, so a run stopped mid-round has spends the server never heard of), else from the run's ``privacy.json``
    (the server's record, written by a run that failed or was stopped)."""
    from fedmm.errors import PrivacyError
    from fedmm.privacy.ledger import PrivacyLedger, find_ledgers

    root = Path(state_dir).expanduser() if state_dir else run_dir / "sites"
    ledgers: list[tuple[str, float]] = []
    for path in find_ledgers([root]) if root.is_dir() else []:
        try:
            with PrivacyLedger.read(path) as ledger:
                mine = [e for e in ledger.entries() if e.run_id == run_dir.name]
                if mine:  # lifetime: a replaced ledger's carried spend adds (as its budget check adds it)
                    ledgers.append((ledger.site, mine[-1].epsilon + (ledger.carried.epsilon if ledger.carried else 0.0)))
        except PrivacyError:
            continue  # `fedmm audit` says what is wrong with it
    record = run_dir / "privacy.json"
    heard = json.loads(record.read_text()).get("sites", []) if record.is_file() else None
    if ledgers:
        told = "" if heard is None else f"; the server heard of {len(heard)} of them ({record})"
        spends = ", ".join(f"{site} epsilon {epsilon:.3f}" for site, epsilon in ledgers)
        console.print(f"{heading}: {spends} (lifetime, each site's own ledger: fedmm audit {root}){told}", markup=False, highlight=False)
    elif heard is not None:
        spends = ", ".join(f"{s['site']} epsilon {s['epsilon']:.3f}" for s in heard) or "no site reported a spend"
        console.print(f"{heading}: {spends} (in {record})", markup=False, highlight=False)


def _report_interrupted(run_dir: Path, log_file: Path, state_dir: str = "") -> int:
    """Say what an interrupted run left (its last checkpoint, what the sites spent); return 130, the shell's code for Ctrl-C."""
    checkpoint = run_dir / "checkpoint.json"
    done = json.loads(checkpoint.read_text()).get("round") if checkpoint.is_file() else None
    console.print(f"[yellow]interrupted[/yellow] (Ctrl-C, SIGTERM or SIGHUP): {'no round was checkpointed' if done is None else f'last checkpoint after round {done}'}; run folder {run_dir}", highlight=False)
    _print_spends(run_dir, "privacy spent so far", state_dir)
    if not (run_dir / "privacy.json").is_file() and (run_dir / "sites").is_dir():  # --superlink: the ServerApp process was stopped before writing it
        console.print(f"each site's spends are in its ledger: fedmm audit {run_dir / 'sites'}", markup=False, highlight=False)
    console.print(f"{resume_advice(done)} (docs/runs.md); full log: {log_file}", highlight=False)
    return 130


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

    with exit_on_error():
        raise typer.Exit(run_server(pki, state_dir, host=host, port=port, in_memory=in_memory))


@app.command()
def site(config: Annotated[Path, typer.Argument(help="the site's own TOML file ([site] table, see docs/deploy.md)")]) -> None:
    """Run one data site: its SuperNode (TLS, its registered key, its own budget and data) and its long-lived ClientApp executor."""
    from fedmm.runtime.deploy import SiteSettings, run_site

    with exit_on_error():
        raise typer.Exit(run_site(SiteSettings.load(config)))
