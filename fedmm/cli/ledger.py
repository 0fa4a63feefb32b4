"""``fedmm ledger``: the explicit, logged lifecycle of a site's privacy ledger.

A site trains under DP only with its ledger, and a missing ledger is never remade on its
own (that would forget what the site has spent). ``fedmm ledger init`` makes a site's
first one, and, with ``--replace-lost``, the replacement of one lost for good, carrying the
lost spend over. ``fedmm ledger recover`` adds back to a ledger restored from an older backup
the spends its spend log (``ledger.sqlite.spends``) records past its end. Each is logged beside
the ledger (``ledger.sqlite.log``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from fedmm.cli.common import app, console, exit_on_error
from fedmm.errors import ConfigError

__all__ = ["ledger_app", "ledger_init", "ledger_recover"]

ledger_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make a site's privacy ledger (once, logged), or recover its spends after a restore.")
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("init")
def ledger_init(
    state_dir: Annotated[Path, typer.Argument(help="the site's state directory (its ledger goes in STATE_DIR/ledger.sqlite)")],
    site: Annotated[str, typer.Option(help="the site's name, as in its site file and its SuperNode key")],
    reason: Annotated[str, typer.Option(help="why, for the ledger's log")] = "a new site",
    replace_lost: Annotated[bool, typer.Option("--replace-lost", help="replace a ledger lost for good (its anchor or log remain)")] = False,
    carried_epsilon: Annotated[float | None, typer.Option(help="--replace-lost: the epsilon the lost ledger had spent")] = None,
    carried_delta: Annotated[float | None, typer.Option(help="--replace-lost: the delta it was stated at")] = None,
) -> None:
    """Make a site's first privacy ledger, or (--replace-lost) the replacement of one lost for good."""
    from fedmm.privacy.ledger import CarriedSpend, PrivacyLedger

    with exit_on_error():
        carried = None
        if replace_lost:
            if carried_epsilon is None or carried_delta is None or not math.isfinite(carried_epsilon) or carried_epsilon < 0 or not 0 <= carried_delta < 1:
                raise ConfigError(
                    "--carried-epsilon/--carried-delta", "--replace-lost needs the spend of the lost ledger, as a finite epsilon >= 0 "
                    "and a delta in [0, 1)", value=(carried_epsilon, carried_delta),
                    fix="take them from the server's last privacy.json for this site, or the site's last audit",
                )
            if reason == "a new site":
                raise ConfigError("--reason", "say why the ledger is replaced, for its log", value=reason, fix="e.g. --reason 'disk failure, no backup'")
            carried = CarriedSpend(carried_epsilon, carried_delta, reason)
        elif carried_epsilon is not None or carried_delta is not None:
            raise ConfigError("--carried-epsilon", "only goes with --replace-lost", value=carried_epsilon, fix="add --replace-lost, or drop it")
        ledger = PrivacyLedger.create(state_dir / "ledger.sqlite", site=site, reason=reason, carried=carried)
        ledger.close()
    what = f"replacement ledger (carrying epsilon {carried.epsilon:g} at delta {carried.delta:g})" if carried else "ledger"
    console.print(f"site {site}: new {what} at {ledger.path}; logged in {ledger.path.name}.log", markup=False, highlight=False)


@ledger_app.command("recover")
def ledger_recover(
    state_dir: Annotated[Path, typer.Argument(help="the site's state directory (STATE_DIR/ledger.sqlite, restored from a backup)")],
    site: Annotated[str, typer.Option(help="the site's name, as in its site file and its SuperNode key")],
) -> None:
    """Add back to a ledger restored from an older backup the spends its spend log recorded after the backup."""
    from fedmm.privacy.ledger import PrivacyLedger

    path = state_dir / "ledger.sqlite"
    with exit_on_error():
        recovered = PrivacyLedger.recover(path, site=site)
        with PrivacyLedger.open(path, site=site, wait=2.0) as ledger:  # the site's own check: refuses what still does not verify
            seq, _ = ledger.head()
            epsilon = ledger.entries()[-1].epsilon if seq else 0.0
    if recovered:
        what = f"added back entries {recovered[0].seq}-{recovered[-1].seq} from {path.name}.spends; logged in {path.name}.log"
    else:
        what = "nothing to add back: the ledger holds every spend its spend log records"
    console.print(f"site {site}: {what}; the ledger ends at entry {seq}, epsilon {epsilon:.6g}", markup=False, highlight=False)
