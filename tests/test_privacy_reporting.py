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
    reported = {s["site"]: s for s in json.loads((run / "privacy.json").read_text())["sites"]}
    ledgers = {audit.site: audit for audit in map(audit_ledger, find_ledgers([run / "sites"]))}
    assert [len(ledgers[s].entries) for s in ("0", "1", "2")] == [2, 2, 1]  # sites 0 and 1 spent in round 2
    for site in ("0", "1", "2"):
        assert reported[site]["epsilon"] == pytest.approx(ledgers[site].epsilon), site  # every spend is reported
        assert reported[site]["ledger_seq"] == ledgers[site].ledger_seq
    assert summary["max_epsilon"] == pytest.approx(max(ledgers[s].epsilon for s in ledgers))
    assert "refuses round 2" in reported["2"]["refused"]
