"""A site that changes accountant between runs (rdp, then prv): its honest ledger audits ok, and says how its figure was got.

A stated epsilon never falls, so after an rdp run the site states max(prv over all its events, the
rdp figure stated before) for a nearly free prv round. The audit recomputed that entry with prv
alone and failed an honest ledger ("states 7.99683, its events give 7.44566"); the entry said "prv".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmm.cli import app
from fedmm.config import AccountantKind, RunConfig
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.audit import audit_ledger
from fedmm.privacy.ledger import PrivacyLedger
from fedmm.privacy.policy import SitePolicy
from fedmm.site.round import SiteState, train_round

RDP = RunConfig(data="synthetic", modalities="tabular", batch_size=16, noise_multiplier=1.0, target_epsilon=1000.0, rounds=100)
PRV = RDP.replace(accountant=AccountantKind.PRV, noise_multiplier=50.0)  # nearly free: prv over all events stays below rdp's figure


def _round(cfg: RunConfig, policy: SitePolicy, site_data, *, run: str, server_round: int):
    data, weights = site_data
    with PrivacyLedger.open(policy.ledger_path, site="george", create_if_new=True) as ledger:
        return train_round(
            cfg=cfg, site="george", data=data, global_weights=weights, server_round=server_round,
            state=SiteState(plan=None, accountant=SiteAccountant(cfg.accountant)), policy=policy, ledger=ledger, run_id=run,
        )


def _audit(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", *args], env={"COLUMNS": "240"})
    return result.exit_code, result.output


def _switched_ledger(tmp_path: Path, site_data) -> SitePolicy:
    policy = SitePolicy(state_dir=tmp_path / "george", epsilon_budget=1000.0, fresh_state=True)
    for r in (1, 2):
        _round(RDP, policy, site_data, run="study-rdp", server_round=r)
    _round(PRV, policy, site_data, run="study-prv", server_round=1)
    return policy


def test_an_honest_ledger_that_changes_accountant_between_runs_audits_ok(tmp_path: Path, site_data) -> None:
    policy = _switched_ledger(tmp_path, site_data)
    with PrivacyLedger.read(policy.ledger_path) as ledger:
        entries = ledger.entries()
    prv_alone = SiteAccountant(AccountantKind.PRV, [e.event for e in entries]).epsilon(entries[-1].delta)
    assert prv_alone < entries[1].epsilon * 0.99  # the case at hand: prv over all events gives less than rdp stated

    audit = audit_ledger(policy.ledger_path)

    assert audit.ok and audit.problems == [], audit.problems
    assert entries[2].epsilon == entries[1].epsilon  # held: a stated epsilon never falls
    # The entry says how its figure was got: the larger of prv over all events and the figure from rdp before it.
    assert [e.accountant for e in entries] == ["rdp", "rdp", "max(prv,rdp)"]
    assert audit.entries[-1]["epsilon_recomputed"] == pytest.approx(entries[1].epsilon, rel=1e-9)
    assert not audit.disagrees and audit.epsilon == pytest.approx(entries[1].epsilon, rel=1e-9)
    assert any("entry 3 (max(prv,rdp): prv alone gives" in note and "states the figure stated before it" in note for note in audit.notes)
    assert audit.run_details[-1]["run_id"] == "study-prv" and audit.run_details[-1]["epsilon"] < 1.0  # the prv run's own figure
    code, output = _audit(str(policy.state_dir), "--json")
    assert code == 0 and json.loads(output)["sites"][0]["ok"]


def test_a_ledger_written_before_the_label_said_so_audits_ok_too(tmp_path: Path, site_data, monkeypatch) -> None:
    """Ledgers written by fedmm before this fix label the held figure "prv": the same rule recomputes them."""
    import fedmm.privacy.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "held_label", lambda own, previous: own)
    policy = _switched_ledger(tmp_path, site_data)

    audit = audit_ledger(policy.ledger_path)

    assert [e["accountant"] for e in audit.entries] == ["rdp", "rdp", "prv"]
    assert audit.ok, audit.problems


def test_the_audit_stays_strict_a_stated_epsilon_below_what_the_events_give_fails(tmp_path: Path) -> None:
    """After a switch, holding the earlier figure is right only while the new accountant gives less."""
    path = tmp_path / "ledger.sqlite"
    rdp = SiteAccountant(AccountantKind.RDP)
    with PrivacyLedger.create(path, site="george") as ledger:
        for r in (1, 2):
            rdp.record(noise_multiplier=1.0, sample_rate=0.25, steps=4)
            ledger.append(run_id="a", round=r, noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5, accountant="rdp",
                          epsilon=rdp.epsilon(1e-5), epsilon_budget=100.0, data="d")
        held = rdp.epsilon(1e-5)
        # A costly prv round (noise 0.5) that states the earlier figure: prv over all events gives far more.
        entry = ledger.append(run_id="b", round=1, noise_multiplier=0.5, sample_rate=0.25, steps=8, delta=1e-5, accountant="prv",
                              epsilon=held, epsilon_budget=100.0, data="d")
    events = [*rdp.history, entry.event]
    truth = SiteAccountant(AccountantKind.PRV, events).epsilon(1e-5)
    assert truth > held * 1.5

    audit = audit_ledger(path)

    assert not audit.ok and audit.over_budget is False
    assert f"entry 3: the ledger states epsilon {held:.6g}, its events give {truth:.6g}" in audit.problems
    assert audit.epsilon == pytest.approx(truth, rel=1e-9)  # the headline is the larger figure, never the kinder one
    assert _audit(str(path))[0] == 1


def test_a_budget_raised_or_a_delta_loosened_between_runs_is_shown_by_the_audit(tmp_path: Path) -> None:
    """Privacy-officer finding: a site that ran out raised its own budget and went on; each spend was
    within the budget it was made under, so the audit was silent that the budget had moved. (A delta
    raised would lower the stated epsilon, which the ledger refuses; a delta lowered is shown.)"""
    from typer.testing import CliRunner

    from fedmm.cli import app

    path = tmp_path / "ledger.sqlite"
    rdp = SiteAccountant(AccountantKind.RDP)
    with PrivacyLedger.create(path, site="george") as ledger:
        for run, r, budget, delta in (("a", 1, 1.0, 1e-5), ("a", 2, 1.0, 1e-5), ("b", 1, 4.0, 1e-5), ("c", 1, 4.0, 1e-6)):
            rdp.record(noise_multiplier=3.0, sample_rate=0.05, steps=20)
            ledger.append(run_id=run, round=r, noise_multiplier=3.0, sample_rate=0.05, steps=20, delta=delta, accountant="rdp",
                          epsilon=rdp.epsilon(delta), epsilon_budget=budget, data="d")

    audit = audit_ledger(path)

    assert audit.ok, audit.problems  # every spend within the budget it was made under: not a violation
    assert [(c["seq"], c["setting"], c["before"], c["after"]) for c in audit.changes] == [(3, "epsilon budget", 1.0, 4.0), (4, "delta", 1e-5, 1e-6)]
    assert any("epsilon budget raised from 1 to 4 at entry 3 (run b" in n for n in audit.notes), audit.notes
    assert any("delta lowered from 1e-05 to 1e-06 at entry 4 (run c" in n for n in audit.notes), audit.notes
    shown = CliRunner().invoke(app, ["audit", str(path)], env={"COLUMNS": "250"})
    assert "epsilon budget raised from 1 to 4" in shown.stdout, shown.stdout
    assert json.loads(CliRunner().invoke(app, ["audit", str(path), "--json"]).stdout)["sites"][0]["changes"][0]["after"] == 4.0
