"""Deployment faults: the server resumes from its checkpoint, sites reconcile with their ledgers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

import server.app as server_app
from clients.app import app as client_app
from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.errors import ConfigError
from fedmm.privacy.audit import audit_ledger
from fedmm.privacy.ledger import find_ledgers
from fedmm.secure.local import LocalGrid, stage_of


class ServerKilled(Exception):
    """Stands for the server process dying at that moment."""


def _run(cfg: RunConfig, *, kill_at: tuple[int, str] | None = None) -> None:
    run_config = cfg.to_run_config()
    seen: dict[str, int] = {}

    def kill(node: int, msg: Message) -> bool:
        stage = stage_of(msg)
        plain = msg.content.config_records.get(protocol.CONFIG)  # Flower's new API sends no group id; fedmm's config has the round
        round_ = int(plain[protocol.SERVER_ROUND]) if plain is not None else int(msg.metadata.group_id)  # type: ignore[call-overload]
        if kill_at is not None and (round_, stage) == kill_at:
            raise ServerKilled(f"killed at round {round_}, stage {stage}")
        seen[stage] = seen.get(stage, 0) + 1
        return False

    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": cfg.sites} for i in range(cfg.sites)], run_config, drop=kill)
    server_app.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))


@pytest.mark.parametrize("secure", [False, True])
def test_a_server_killed_between_rounds_resumes_from_its_checkpoint(tmp_path: Path, secure: bool) -> None:
    cfg = RunConfig(data="synthetic:300", sites=3, rounds=3, runs_dir=str(tmp_path), run_name="run", secure_aggregation=secure, noise_multiplier=1.5, target_epsilon=50.0)
    first_stage = "setup" if secure else "plain"

    with pytest.raises(ServerKilled):
        _run(cfg, kill_at=(3, first_stage))  # dies after round 2's checkpoint, before round 3 reaches a site
    checkpoint = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert checkpoint["round"] == 2

    _run(cfg.replace(resume=True))

    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["stopped"] is None and summary["unaggregated_spends"] == {}
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    sites = {s["site"]: s for s in json.loads((run / "privacy.json").read_text())["sites"]}
    for path in find_ledgers([run / "sites"]):
        report = audit_ledger(path)
        assert report.ok and [e["round"] for e in report.entries] == [1, 2, 3]  # each round spent once: no double spend
        assert sites[report.site]["epsilon"] == pytest.approx(report.entries[-1]["epsilon"])  # and none lost


def test_spends_of_a_round_lost_with_the_server_are_kept_and_counted(tmp_path: Path) -> None:
    cfg = RunConfig(data="synthetic:300", sites=3, rounds=3, runs_dir=str(tmp_path), run_name="run", secure_aggregation=True, noise_multiplier=1.5, target_epsilon=50.0)

    with pytest.raises(ServerKilled):
        _run(cfg, kill_at=(3, "unmask"))  # the sites trained round 3 and sent masked updates; the server died before unmasking

    _run(cfg.replace(resume=True))

    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 3 and sorted(summary["unaggregated_spends"].values()) == [1, 1, 1]
    sites = {s["site"]: s for s in json.loads((run / "privacy.json").read_text())["sites"]}
    for path in find_ledgers([run / "sites"]):
        report = audit_ledger(path)
        assert report.ok and [e["round"] for e in report.entries] == [1, 2, 3, 3]  # round 3 was trained twice: both spends count
        assert sites[report.site]["epsilon"] == pytest.approx(report.entries[-1]["epsilon"])


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        _run(RunConfig(data="synthetic:300", sites=3, rounds=2, runs_dir=str(tmp_path), run_name="none", resume=True))
