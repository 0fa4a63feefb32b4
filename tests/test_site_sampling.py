"""client-fraction asks a share of the sites each round; a site not asked trains and spends nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedmm.config import RunConfig
from fedmm.federation.book import FederationBook
from fedmm.runtime.local import LocalGrid


def test_without_client_dp_a_fixed_share_is_drawn_with_the_seed_and_round() -> None:
    book = FederationBook(dp=True, client_fraction=0.1, seed=3)
    nodes = list(range(100, 1100))
    first = book.sample_nodes(1, nodes)
    assert len(first) == 100 and set(first) <= set(nodes) and first == sorted(first)
    assert book.sample_nodes(1, nodes) == first  # the seed and the round decide: a replay asks the same sites
    assert book.sample_nodes(2, nodes) != first
    assert FederationBook(dp=True, client_fraction=0.1, seed=4).sample_nodes(1, nodes) != first
    assert FederationBook(dp=True).sample_nodes(1, nodes) == nodes  # client-fraction=1: every site
    few = FederationBook(dp=True, client_fraction=0.1, min_sites=3)
    assert len(few.sample_nodes(1, range(10))) == 3  # never fewer than min-sites, never an empty round
    few.refused_nodes.update({0, 1, 2, 3, 4, 5, 6, 7})
    assert few.sample_nodes(2, range(10)) == [8, 9]  # refused sites are not asked; require_sites decides what follows


def test_a_site_not_asked_spends_nothing_and_the_server_accounts_each_site_exactly(tmp_path: Path) -> None:
    # 4 sites, half asked each round, 3 rounds of sample-level DP: each site's ledger holds one entry per
    # round it trained and none for the others, and the server's account of every site agrees with its ledger.
    import server.app as server_app
    from clients.app import app as client_app
    from fedmm.privacy.audit import audit_ledger
    from fedmm.privacy.ledger import find_ledgers

    cfg = RunConfig(data="synthetic:200", sites=4, rounds=3, client_fraction=0.5, partitioner="iid", runs_dir=str(tmp_path), run_name="sampled")
    run_config = cfg.to_run_config()
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 4} for i in range(4)], run_config)

    server_app.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))

    run = tmp_path / "sampled"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 3
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    asked = {r["round"]: r["participants"] for r in rounds if r.get("round", 0) >= 1}
    assert sorted(asked) == [1, 2, 3] and all(len(names) == 2 for names in asked.values()), asked
    assert len({tuple(names) for names in asked.values()}) > 1 or len(set(sum(asked.values(), []))) < 4  # drawn, not fixed
    ledgers = {audit.site: audit for audit in map(audit_ledger, find_ledgers([run / "sites"]))}
    reported = {s["site"]: s for s in json.loads((run / "privacy.json").read_text())["sites"]}
    for site in ("0", "1", "2", "3"):
        trained = sum(site in names for names in asked.values())
        entries = len(ledgers[site].entries) if site in ledgers else 0
        assert entries == trained, (site, entries, asked)  # no entry for a round the site was not asked
        if trained:
            assert reported[site]["epsilon"] == pytest.approx(ledgers[site].epsilon), site
            assert reported[site]["ledger_seq"] == ledgers[site].ledger_seq
            assert reported[site]["epsilon_server"] == pytest.approx(reported[site]["epsilon_site"], rel=1e-6), site
        else:
            assert site not in reported
