"""A run that spent privacy budget always reports it, whatever became of the updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedmm.config import RunConfig
from fedmm.runtime.local import LocalGrid


def _one_round_budget(cfg: RunConfig, site: str) -> float:
    """A budget between what ``site`` spends in one round and in two (so it refuses round 2)."""
    from fedmm.cli.common import load_federation
    from fedmm.plan import RunPlan
    from fedmm.privacy.accounting import SiteAccountant
    from fedmm.site.round import plan_site

    plan = RunPlan.from_config(cfg)
    federation = load_federation(plan)
    records = len(plan.model.prepare(federation.sites[federation.names.index(site)]).labelled())
    site_plan = plan_site(cfg, records)
    accountant, spent = SiteAccountant(cfg.accountant), []
    for _ in range(2):
        accountant.record(noise_multiplier=site_plan.noise_multiplier, sample_rate=site_plan.sample_rate, steps=site_plan.steps_per_round)
        spent.append(accountant.epsilon(cfg.target_delta))
    return (spent[0] + spent[1]) / 2


def test_updates_discarded_below_min_sites_still_reach_privacy_json(tmp_path: Path) -> None:
    # Site 2 can afford one round. In round 2 sites 0 and 1 train (and spend), site 2 refuses, and
    # the two updates are discarded below min-sites=3: their round-2 spend must still be reported.
    import server.app as server_app
    from clients.app import app as client_app
    from fedmm.privacy.audit import audit_ledger
    from fedmm.privacy.ledger import find_ledgers

    cfg = RunConfig(data="synthetic:300", sites=3, rounds=2, min_sites=3, runs_dir=str(tmp_path), run_name="discarded")
    cfg = cfg.replace(site_budgets=f"2:{_one_round_budget(cfg, '2'):.6f}")
    run_config = cfg.to_run_config()
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)

    server_app.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))

    run = tmp_path / "discarded"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 1 and "fewer than min-sites=3" in summary["stopped"]
    assert summary["status"] == "stopped"  # some rounds trained, then the sites' budgets ran out: a normal end
    reported = {s["site"]: s for s in json.loads((run / "privacy.json").read_text())["sites"]}
    ledgers = {audit.site: audit for audit in map(audit_ledger, find_ledgers([run / "sites"]))}
    assert [len(ledgers[s].entries) for s in ("0", "1", "2")] == [2, 2, 1]  # sites 0 and 1 spent in round 2
    for site in ("0", "1", "2"):
        assert reported[site]["epsilon"] == pytest.approx(ledgers[site].epsilon), site  # every spend is reported
        assert reported[site]["ledger_seq"] == ledgers[site].ledger_seq
    assert summary["max_epsilon"] == pytest.approx(max(ledgers[s].epsilon for s in ledgers))
    assert "refuses round 2" in reported["2"]["refused"]


def test_a_run_that_trains_no_round_fails_after_writing_its_summary(tmp_path: Path) -> None:
    # Every site's budget is below one round's spend: every site refuses round 1, nothing is trained.
    # The ServerApp writes summary.json (status failed, the reason) and then raises, so Flower
    # records the run as finished:failed rather than completed.
    import server.app as server_app
    from clients.app import app as client_app
    from fedmm.errors import FederationError

    cfg = RunConfig(data="synthetic:300", sites=3, rounds=2, runs_dir=str(tmp_path), run_name="nothing", site_budgets="*:0.001")
    run_config = cfg.to_run_config()
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)

    with pytest.raises(FederationError, match="no round was aggregated"):
        server_app.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))

    summary = json.loads((tmp_path / "nothing" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] == 0 and "0 update(s) could be aggregated" in summary["stopped"]
    assert all(s["refused"] for s in json.loads((tmp_path / "nothing" / "privacy.json").read_text())["sites"])


@pytest.mark.parametrize(("flower_status", "status", "code"), [("finished:failed", "failed", 1), ("finished:completed", "stopped", 0), ("finished:completed", "failed", 1)])
def test_fedmm_simulate_prints_the_status_and_exits_non_zero_for_a_failed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flower_status: str, status: str, code: int,
) -> None:
    # Flower's side stands in (a real `fedmm simulate` takes a minute): the run's folder as the ServerApp leaves it.
    from typer.testing import CliRunner

    from fedmm.cli import app
    from fedmm.runtime import simulation

    def fake_run(cfg: RunConfig, *, on_line: object) -> simulation.SimulationOutcome:
        run_dir = Path(cfg.runs_dir) / cfg.run_name
        run_dir.mkdir(parents=True)
        (run_dir / "privacy.json").write_text(json.dumps({"sites": []}))
        (run_dir / "summary.json").write_text(json.dumps({
            "run_id": cfg.run_name, "rounds": 0 if status == "failed" else 1, "rounds_planned": 2, "status": status,
            "stopped": "round 1: 0 update(s) could be aggregated, fewer than min-sites=2", "sites": 0, "dp": True,
            "max_epsilon": None, "final_accuracy": 0.1, "wall_seconds": 1.0,
        }))
        return simulation.SimulationOutcome("1", flower_status, "ServerApp raised FederationError", run_dir, run_dir / "flower.log")

    monkeypatch.setattr(simulation, "run_simulation", fake_run)
    from fedmm.runtime import embedded  # the default path: Flower's engine in the CLI's process

    monkeypatch.setattr(embedded, "run_embedded", lambda cfg, *, on_line, verbose=False, ray=False: fake_run(cfg, on_line=on_line))
    result = CliRunner().invoke(app, ["simulate", "--set", "data=synthetic:300", "--set", "sites=2", "--set", "rounds=2", "--set", f"runs-dir={tmp_path}"], env={"COLUMNS": "200"})

    assert result.exit_code == code, result.output
    assert f"status: {status}" in result.output and "fewer than min-sites=2" in result.output
