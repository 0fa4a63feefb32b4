"""The ``fedmm`` command.

``fedmm simulate [PRESET] [--set key=value ...]`` runs a federation offline and
writes ``runs/<run-id>/``; it exits 0 only when the run completed.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedmm.artifacts import new_run_id
from fedmm.config import RunConfig
from fedmm.data.avmnist import SPEAKERS, resolve_root
from fedmm.errors import ConfigError, FedMMError

__all__ = ["app", "main", "parse_overrides"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fedmm: private multimodal federated learning.")
console = Console()
_MARK = "[fedmm] "


@app.callback()
def _root() -> None:
    """fedmm: private multimodal federated learning on Flower and Opacus."""


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
    table = Table(title=f"fedmm run {summary['run_id']}")
    for column in ("site", "epsilon", "delta", "accountant", "noise multiplier", "sample rate", "steps"):
        table.add_column(column)
    for site in privacy:
        table.add_row(
            site["site"], f"{site['epsilon']:.3f}", f"{site['delta']:g}", site["accountant"],
            f"{site['noise_multiplier']:.3f}", f"{site['sample_rate']:.4f}", str(site["steps"]),
        )
    if privacy:
        console.print(table)
    eps = summary["max_epsilon"]
    privacy_text = f"max epsilon {eps:.3f} at delta {summary['delta']:g} ({summary['accountant']})" if eps is not None else "no differential privacy"
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
    from fedmm.simulation import run_simulation  # imported late: keeps `fedmm --help` fast

    try:
        values = {**_load_preset(preset), **parse_overrides(set_ or [])}
        cfg = RunConfig.from_run_config(values)
        cfg = cfg.replace(run_name=cfg.run_name or new_run_id())
        resolve_root(cfg.data)  # a bad data location fails here, before Flower starts
        if cfg.sites > len(SPEAKERS):
            raise ConfigError("sites", f"AV-MNIST has {len(SPEAKERS)} sites (FSDD speakers)", value=cfg.sites, fix=f"use sites between 1 and {len(SPEAKERS)}")
    except FedMMError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    console.print(f"fedmm: simulating {cfg.sites} sites x {cfg.rounds} rounds, dp={cfg.dp}, data={cfg.data} (run {cfg.run_name})")

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


def main() -> None:
    """Entry point of the ``fedmm`` console script."""
    sys.exit(app())
