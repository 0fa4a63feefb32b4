"""``fedmm data check`` and ``fedmm data split``: a site's manifest and a simulated federation, before any training."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape

from fedmm.cli.common import console, data_app, exit_on_error, build_plan, federation_usage, load_federation, load_preset, parse_overrides
from fedmm.cli.tables import FitTable
from fedmm.config import RunConfig

__all__ = ["data_check", "data_split"]


def _counts_table(title: str, rows: dict[str, dict[str, Any]], classes: tuple[str, ...], modalities: tuple[str, ...]) -> FitTable:
    """One column per site (or group), one row per count: narrow enough for a terminal (else one block a count)."""
    table = FitTable(title, ("", *rows), justify={name: "right" for name in rows})
    counts = list(rows.values())
    table.add_row("samples", *(str(c["samples"]) for c in counts), style="bold")
    for m in modalities:
        table.add_row(f"with {m}", *(str(c["per_modality"][m]) for c in counts))
    for k in classes:
        table.add_row(f"class {k}", *(str(c["per_class"][k]) for c in counts), style="cyan")
    if any(c["unlabelled"] for c in counts):
        table.add_row("unlabelled", *(str(c["unlabelled"]) for c in counts))
    return table


MAX_LISTED = 50  # bad rows printed by `fedmm data check`; --skipped-csv writes them all
CSV_FIELDS = ("row", "column", "file", "reason", "problem", "fix", "detail")


@data_app.command("check")
def data_check(
    manifest: Annotated[Path, typer.Argument(help="a .csv or .parquet manifest")],
    lenient: Annotated[bool, typer.Option("--lenient", help="skip bad rows (listed, and counted per reason) instead of failing")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="a preprocessing key: --set image-size=64")] = None,
    skipped_csv: Annotated[Path | None, typer.Option("--skipped-csv", help="write every bad row (row, column, file, reason, fix) to this CSV")] = None,
    root: Annotated[list[Path] | None, typer.Option("--root", help="a folder the manifest's files may lie in (repeatable; default: the manifest's folder)")] = None,
) -> None:
    """Validate a manifest: load every row as training would; list every bad row; print counts per modality, class and site."""
    from fedmm.data.manifest import check_manifest
    from fedmm.errors import DataError

    with exit_on_error():
        run_plan = build_plan(RunConfig.from_run_config(parse_overrides(set_ or [])))
        cfg = run_plan.config
        try:
            report = check_manifest(manifest, run_plan.preprocessing, classes=cfg.class_list, lenient=lenient, roots=tuple(root or ()))
        except DataError as err:  # this terminal is the site's own: the local detail (paths, values) helps here
            console.print(f"[red]error:[/red] {escape(err.local_message)}", soft_wrap=True)
            raise typer.Exit(1) from err
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    if skipped_csv is not None:
        _write_problems(skipped_csv, report.problems)
    ds = report.dataset
    if ds is None:
        what = "bad rows" if not lenient else "bad rows and no usable row"
        console.print(f"[red]error:[/red] {len(report.problems)} {what} in {escape(str(manifest))}:", soft_wrap=True)
        _list_problems(report.problems, skipped_csv)
        raise typer.Exit(1)
    schema = ds.schema
    mods = FitTable(f"{manifest}: {len(ds)} samples", ("modality", "kind", "shape", "present", "missing"))
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
        skips = FitTable(f"skipped rows: {sum(ds.skipped.values())}", ("reason", "rows"), justify={"rows": "right"})
        for reason, n in sorted(ds.skipped.items()):
            skips.add_row(reason, str(n))
        console.print(skips)
        _list_problems(report.problems, skipped_csv)
    for warning in report.warnings:  # once the rows load: bad rows come first
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    console.print(f"[green]ok[/green]: {len(ds)} samples usable" + (f", {sum(ds.skipped.values())} skipped" if ds.skipped else ""))


def _list_problems(problems: tuple[Any, ...], written: Path | None) -> None:
    """One line a bad row (its local detail included: this is the site's own terminal), up to MAX_LISTED."""
    for problem in problems[:MAX_LISTED]:
        console.print(f"  {escape(problem.local_message)}", soft_wrap=True, highlight=False)
    if len(problems) > MAX_LISTED:
        where = f"all are in {written}" if written else "--skipped-csv PATH writes them all"
        console.print(f"  ... and {len(problems) - MAX_LISTED} more ({escape(where)})", soft_wrap=True)


def _write_problems(path: Path, problems: tuple[Any, ...]) -> None:
    """Every bad row as a CSV for the data manager; a cell that a spreadsheet would run as a formula is quoted with '."""
    def safe(value: object) -> str:
        text = "" if value is None else str(value)
        return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for p in problems:
            writer.writerow([safe(v) for v in (p.row, p.column, p.file, p.reason, p.problem, p.fix, p.detail)])
    console.print(f"{len(problems)} bad rows written to {escape(str(path))}", soft_wrap=True)


@data_app.command("split")
def data_split(
    preset: Annotated[Path | None, typer.Argument(help="TOML file of run-config keys (see simulations/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a run-config key: --set partitioner=dirichlet")] = None,
) -> None:
    """Show how the configured simulated federation splits the data across sites."""
    with exit_on_error():
        cfg = RunConfig.from_run_config({**load_preset(preset), **parse_overrides(set_ or [])})
        federation = load_federation(build_plan(cfg))
    summary = federation.summary()
    schema = federation.sites[0].schema
    title = f"{cfg.data}: {federation.partitioner} partition into {len(federation.names)} sites (seed {cfg.seed})"
    if summary["synthetic"]:
        title += " - SYNTHETIC data"
    console.print(federation_usage(federation), markup=False, highlight=False)
    console.print(_counts_table(title, summary["sites"], schema.classes, schema.names))
    for name, note in zip(federation.names, federation.notes):
        extra = {k: v for k, v in note.items() if k != "transition_matrix"}
        if extra:
            console.print(f"{name}: {extra}", markup=False, highlight=False)
