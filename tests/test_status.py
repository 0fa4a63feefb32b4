"""`fedmm status RUN`: the truth about a run (a run that trained nothing is failed), every site by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmm.cli import app


def _run(tmp_path: Path, *, rounds: int, summary: dict[str, object] | None, privacy: bool = True) -> Path:
    run = tmp_path / "run-1"
    run.mkdir()
    (run / "config.toml").write_text("rounds = 5\n")
    lines = []
    for r in range(1, rounds + 1):
        participants = ["george", "[bold]lab:AB:[/bold]"] if r < 3 else ["george"]
        lines.append({"round": r, "accuracy": 0.5, "participants": participants, "rejected_by": {"mallory": ["norm"]} if r == 2 else {}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if privacy:
        sites = [
            {"site": "george", "epsilon": 7.5, "epsilon_budget": 8.0, "refused": None},
            {"site": "[bold]lab:AB:[/bold]", "epsilon": 3.2, "epsilon_budget": 4.0, "refused": "round 3 would take epsilon to 4.4, over its budget 4"},
        ]
        (run / "privacy.json").write_text(json.dumps({"sites": sites, "client_level": None}))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps({"rounds": rounds, "rounds_planned": 5, **summary}))
    return run


@pytest.mark.parametrize(
    ("rounds", "summary", "privacy", "state", "code"),
    [
        (5, {"stopped": None}, True, "COMPLETED", 0),
        (4, {"stopped": "fewer than min-sites=2 sites still have budget"}, True, "STOPPED", 3),
        (0, {"stopped": "every site refused"}, True, "FAILED", 1),  # `flwr ls` says finished:completed for this one
        (2, None, True, "FAILED", 1),  # the server failed: privacy.json alone
        (2, None, False, "RUNNING", 0),
    ],
)
def test_the_state_and_exit_code_say_what_became_of_the_run(tmp_path: Path, rounds: int, summary: dict[str, object] | None, privacy: bool, state: str, code: int) -> None:
    result = CliRunner().invoke(app, ["status", str(_run(tmp_path, rounds=rounds, summary=summary, privacy=privacy))], env={"COLUMNS": "80"})
    assert result.exit_code == code, result.output
    assert f"run run-1: {state}" in result.output


def test_every_site_is_named_with_its_rounds_spend_refusal_and_rejections(tmp_path: Path) -> None:
    run = _run(tmp_path, rounds=4, summary={"stopped": None})
    result = CliRunner().invoke(app, ["status", str(run)], env={"COLUMNS": "80"})
    assert "[bold]lab:AB:[/bold] refused: round 3 would take epsilon to 4.4" in result.output  # data printed literally
    assert "mallory rejected: {'norm': 1}" in result.output
    assert all(len(line) <= 80 for line in result.output.splitlines())
    data = json.loads(CliRunner().invoke(app, ["status", str(run), "--json"]).output)
    by_name = {s["name"]: s for s in data["sites"]}
    assert by_name["george"]["rounds_trained"] == 4 and by_name["george"]["last_round"] == 4
    assert by_name["[bold]lab:AB:[/bold]"]["rounds_trained"] == 2 and by_name["[bold]lab:AB:[/bold]"]["remaining"] == pytest.approx(0.8)


def test_a_folder_that_is_no_run_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 2 and "not a fedmm run folder" in " ".join(result.output.split())


def test_presence_and_unknown_participants_are_shown_as_such(tmp_path: Path) -> None:
    """A site the server lost is LOST with its reason; under SecAgg+ rounds a site trained are unknown, not 0."""
    import time

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("rounds = 4\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "participants": None}) + "\n" for r in (1, 2)))
    now = time.time()
    (run / "presence.json").write_text(json.dumps({"updated": now, "sites": {
        "george": {"node": 1, "state": "online", "last_seen": now - 2, "lost_at": None, "reason": None},
        "theo": {"node": 2, "state": "lost", "last_seen": now - 9, "lost_at": now - 3, "reason": "its heartbeats stopped"},
    }}))
    done = CliRunner().invoke(app, ["status", str(run), "--json"])
    sites = {s["name"]: s for s in json.loads(done.stdout)["sites"]}
    assert done.exit_code == 0 and sites["theo"]["presence"] == "lost" and sites["george"]["presence"] == "online"
    assert sites["george"]["rounds_trained"] is None
    shown = CliRunner().invoke(app, ["status", str(run)], env={"COLUMNS": "80"})
    assert "theo LOST 3 s ago: its heartbeats stopped" in shown.stdout and "rounds ?" in shown.stdout, shown.stdout


def test_a_failed_deployment_run_says_why_and_where_its_log_is(tmp_path: Path) -> None:
    """Operator finding: a run that failed on a site's config error said "see flower.log", which a
    deployment's run folder does not have; the reason was only in the SuperLink's log."""
    run = _run(tmp_path, rounds=0, summary=None)
    result = CliRunner().invoke(app, ["status", str(run)], env={"COLUMNS": "200"})
    assert "flwr log <run-id>" in result.output and "see flower.log" not in result.output  # no reason on record: where to look

    reason = "FederationError: round 1: 1 of 3 sites failed (node 42: site jackson: config key 'node-config data': manifest not found)"
    (run / "failure.json").write_text(json.dumps({"status": "failed", "reason": reason, "rounds": 0}))
    result = CliRunner().invoke(app, ["status", str(run)], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "FAILED" in result.output
    assert "site jackson: config key 'node-config data': manifest not found" in " ".join(result.output.split()), result.output
    (run / "flower.log").write_text("a simulation's log\n")
    assert "details in flower.log" in " ".join(CliRunner().invoke(app, ["status", str(run)], env={"COLUMNS": "200"}).output.split())


def test_an_interrupted_run_says_how_to_resume_it(tmp_path: Path) -> None:
    run = _run(tmp_path, rounds=2, summary=None)
    (run / "failure.json").write_text(json.dumps({"status": "interrupted", "reason": "RunStopped: the run was stopped", "rounds": 2}))
    shown = " ".join(CliRunner().invoke(app, ["status", str(run)], env={"COLUMNS": "200"}).output.split())
    assert "interrupted (Ctrl-C, SIGTERM or SIGHUP) after round 2: resume it with resume=true" in shown, shown
