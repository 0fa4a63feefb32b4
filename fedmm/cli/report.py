"""``fedmm report RUN``: one self-contained HTML page of a run (plots, participation, per class, privacy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedmm.cli.common import app, console, exit_on_error

__all__ = ["report"]


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="the run's folder, runs/<run-id>/")],
    out: Annotated[Path | None, typer.Option("--out", help="where to write the page (default RUN/report.html)")] = None,
) -> None:
    """Write an HTML report of a run: accuracy, macro-F1, loss and epsilon per round, participation, confusion matrix, privacy."""
    from fedmm.federation.report import write_report

    with exit_on_error():
        path = write_report(run, out)
    console.print(str(path), markup=False, highlight=False, soft_wrap=True)
