"""``fedmm status RUN``: a run's state as fedmm knows it, and every site by name.

Read from the run folder the ServerApp writes (``docs/runs.md``): ``summary.json`` (the
outcome), ``metrics.jsonl`` (a line a round, with the sites aggregated), ``privacy.json``
or, while the run goes on, ``checkpoint.json`` (each site's epsilon, budget, refusal), and
``presence.json`` (each site online or lost, when it was last heard, why it was lost). Flower's
own ``flwr ls`` says ``finished:completed`` for a run that trained nothing; this says what
happened: ``completed``, ``stopped`` (sites ran out of budget after some rounds), ``failed``
(no round trained, or the server failed) or ``running``. The exit code says it too
(:data:`EXIT`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from fedmm.cli.common import app, console

__all__ = ["status", "run_status", "RunStatus", "EXIT"]

EXIT = {"completed": 0, "running": 0, "stopped": 3, "failed": 1}  # and 2: not a run folder


@dataclass
class SiteStatus:
    """One site as the server's artifacts show it."""

    name: str
    rounds_trained: int | None = 0  # None: the server cannot know (SecAgg+ hides whose updates a round aggregated)
    last_round: int | None = None
    epsilon: float | None = None
    budget: float | None = None
    refused: str | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    presence: str | None = None  # online | lost (presence.json), None when the server never recorded it
    presence_reason: str | None = None
    last_seen: float | None = None  # unix time of its last reply
    lost_at: float | None = None

    @property
    def remaining(self) -> float | None:
        return None if self.epsilon is None or self.budget is None else self.budget - self.epsilon


@dataclass
class RunStatus:
    """A run's state, rounds and sites."""

    run_dir: Path
    state: str
    reason: str
    rounds_done: int
    rounds_planned: int | None
    last_activity: float | None  # seconds since the run folder last changed
    sites: list[SiteStatus]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_status(run_dir: Path) -> RunStatus:
    """Read ``run_dir``'s artifacts into a :class:`RunStatus` (raises FileNotFoundError for a folder that is no run)."""
    metrics_file, summary = run_dir / "metrics.jsonl", _json(run_dir / "summary.json")
    if summary is None and not metrics_file.is_file() and not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedmm run folder (no summary.json, metrics.jsonl or config.toml)")
    lines = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
    config = {}
    if (run_dir / "config.toml").is_file():
        import tomllib

        config = tomllib.loads((run_dir / "config.toml").read_text())
    privacy = _json(run_dir / "privacy.json")
    checkpoint = _json(run_dir / "checkpoint.json")
    reports = (privacy or {}).get("sites") or ((checkpoint or {}).get("state") or {}).get("site_privacy") or []
    sites: dict[str, SiteStatus] = {}
    for report in reports:
        sites[str(report["site"])] = SiteStatus(
            str(report["site"]), epsilon=report.get("epsilon"), budget=report.get("epsilon_budget"), refused=report.get("refused"),
        )
    for line in lines:
        for name in line.get("participants") or []:
            site = sites.setdefault(str(name), SiteStatus(str(name)))
            site.rounds_trained = (site.rounds_trained or 0) + 1
            site.last_round = int(line["round"])
        for name, reasons in (line.get("rejected_by") or {}).items():
            site = sites.setdefault(str(name), SiteStatus(str(name)))
            for reason in reasons if isinstance(reasons, list) else [reasons]:
                site.rejected[str(reason)] = site.rejected.get(str(reason), 0) + 1
    for name, seen in ((_json(run_dir / "presence.json") or {}).get("sites") or {}).items():
        site = sites.setdefault(str(name), SiteStatus(str(name)))
        site.presence, site.presence_reason = seen.get("state"), seen.get("reason")
        site.last_seen, site.lost_at = seen.get("last_seen"), seen.get("lost_at")
    if lines and all(line.get("participants") is None for line in lines):
        for site in sites.values():
            site.rounds_trained = None
    rounds_done = int(summary["rounds"]) if summary else (int(lines[-1]["round"]) if lines else 0)
    planned = (summary or {}).get("rounds_planned") or config.get("rounds")
    changed = max((p.stat().st_mtime for p in run_dir.iterdir()), default=None)
    activity = None if changed is None else max(0.0, time.time() - changed)
    state, reason = _state(summary, privacy, rounds_done, _json(run_dir / "failure.json"), (run_dir / "flower.log").is_file())
    if state == "running" and _server_gone(run_dir):
        from fedmm.federation.artifacts import resume_advice

        done = (checkpoint or {}).get("round")
        state, reason = "failed", (
            "its server stopped without a word (killed, or its terminal closed): no process holds the run folder. "
            f"`fedmm audit {run_dir / 'sites'}` shows what a simulation's sites spent; "
            + resume_advice(done)
        )
    return RunStatus(run_dir, state, reason, rounds_done, planned, activity, sorted(sites.values(), key=lambda s: s.name))


def _state(summary: dict[str, Any] | None, privacy: Any, rounds_done: int, failure: Any = None, flower_log: bool = True) -> tuple[str, str]:
    if summary is not None:
        stated = summary.get("status")
        stopped = summary.get("stopped")
        if stated in EXIT:
            return stated, stopped or summary.get("reason") or ""
        if rounds_done == 0:
            return "failed", stopped or "no round was trained"
        return ("stopped", stopped) if stopped else ("completed", "")
    log = "flower.log" if flower_log else "the server's log: `flwr log <run-id>`, or `fedmm server`'s output"
    if isinstance(failure, dict) and failure.get("status") == "interrupted":
        after = failure.get("rounds", rounds_done)
        if not after:
            return "failed", ("interrupted (Ctrl-C, SIGTERM or SIGHUP) before its first round ended: nothing to resume; start it again under "
                              "another run-name (its sites' ledgers keep what they spent)")
        return "failed", (f"interrupted (Ctrl-C, SIGTERM or SIGHUP) after round {after}: resume it with resume=true and the "
                          "same run-name; privacy.json records what the sites spent")
    if isinstance(failure, dict) and failure.get("reason"):  # the ServerApp's own account (fedmm.federation.artifacts.FAILURE)
        return "failed", f"{failure['reason']} (details in {log}; privacy.json records what the sites spent)"
    if privacy is not None:  # written alone only by a run that failed
        return "failed", f"the server failed (see {log}); privacy.json records what the sites spent"
    return "running", "no summary yet: the run is going on, or its server died (see the last activity)"


def _server_gone(run_dir: Path) -> bool:
    """Whether the run folder's lock file is there and no process holds it: the ServerApp that wrote it is gone."""
    from fedmm.federation.artifacts import LOCK, run_in_use

    return (run_dir / LOCK).is_file() and run_in_use(run_dir) is None


def _ago(when: float | None, now: float) -> str:
    return "-" if when is None else f"{max(0.0, now - when):.0f} s ago"


def _seen(site: SiteStatus, now: float) -> str:
    """The site's presence: ``online``/``LOST`` and when it last replied."""
    if site.presence is None:
        return "-"
    last = "never replied" if site.last_seen is None else f"replied {_ago(site.last_seen, now)}"
    return f"{'LOST' if site.presence == 'lost' else site.presence}, {last}"


@app.command()
def status(
    run: Annotated[Path, typer.Argument(help="the run's folder, runs/<run-id>")],
    as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """A run's state (completed, stopped and why, failed, running), its rounds, and every site by name; the exit code says it too."""
    try:
        result = run_status(run)
    except FileNotFoundError as err:
        console.print(f"error: {err}. Fix: give a folder under runs/ (`ls runs/`)", markup=False, highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        out = {
            "run": str(result.run_dir), "state": result.state, "reason": result.reason, "rounds_done": result.rounds_done,
            "rounds_planned": result.rounds_planned, "seconds_since_activity": result.last_activity,
            "sites": [{**s.__dict__, "remaining": s.remaining} for s in result.sites],
        }
        console.print_json(json.dumps(out))
        raise typer.Exit(EXIT[result.state])
    planned = f" of {result.rounds_planned}" if result.rounds_planned else ""
    line = Text(f"run {result.run_dir.name}: {result.state.upper()}, {result.rounds_done}{planned} rounds")
    if result.reason:
        line.append(f" ({result.reason})")
    if result.last_activity is not None:
        line.append(f"; last activity {result.last_activity:.0f} s ago")
    console.print(line)
    table = Table(title="sites (epsilon from the sites' privacy reports)", title_justify="left", show_edge=False)
    for column in ("site", "rounds", "last", "epsilon", "left", "state", "seen"):
        table.add_column(column, overflow="fold")
    now = time.time()
    for site in result.sites:
        state = "refused" if site.refused else ("rejected" if site.rejected else "ok")
        table.add_row(
            Text(site.name), "?" if site.rounds_trained is None else str(site.rounds_trained), "-" if site.last_round is None else str(site.last_round),
            "-" if site.epsilon is None else f"{site.epsilon:.3f}", "-" if site.remaining is None else f"{site.remaining:.3f}", state,
            _seen(site, now),
        )
    console.print(table)
    if any(site.rounds_trained is None for site in result.sites):
        console.print(Text("rounds ?: under SecAgg+ the server does not see whose updates a round aggregated (each site's ledger does)"))
    for site in result.sites:
        if site.presence == "lost":
            console.print(Text(f"{site.name} LOST {_ago(site.lost_at, now)}: {site.presence_reason}"))
        if site.refused:
            console.print(Text(f"{site.name} refused: {site.refused}"))
        if site.rejected:
            console.print(Text(f"{site.name} rejected: {site.rejected}"))
    raise typer.Exit(EXIT[result.state])
