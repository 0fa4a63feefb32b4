"""The site privacy ledger: durable, hash-chained, enforced by the site, auditable."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmm.cli import app
from fedmm.config import RunConfig
from fedmm.errors import BudgetExceededError, ConfigError, PrivacyError
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ledger import PrivacyLedger
from fedmm.privacy.policy import SitePolicy, site_policy
from fedmm.site import SiteState, train_round

# a small, fast site: synthetic tabular records, a fixed noise multiplier
CFG = RunConfig(data="synthetic", modalities="tabular", batch_size=16, noise_multiplier=1.0, target_epsilon=1000.0, rounds=100)


def _spend(ledger: PrivacyLedger, epsilon: float, *, run: str = "r1", budget: float = 8.0) -> None:
    n = len(ledger.entries())
    ledger.append(run_id=run, round=n + 1, noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5, accountant="rdp",
                  epsilon=epsilon, epsilon_budget=budget, data="d")


def _true_ledger(path: Path, rounds: int = 4) -> PrivacyLedger:
    """A ledger whose stated epsilons are what Opacus' RDP gives for its events."""
    ledger = PrivacyLedger.create(path, site="george")
    accountant = SiteAccountant(CFG.accountant)
    for r in range(rounds):
        accountant.record(noise_multiplier=1.0, sample_rate=0.25, steps=4)
        _spend(ledger, accountant.epsilon(1e-5), run="r1" if r < 2 else "r2", budget=20.0)
    return ledger


def _audit(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", *args], env={"COLUMNS": "240"})
    return result.exit_code, result.output


def test_entries_are_chained_durable_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    _true_ledger(path).close()

    with PrivacyLedger.open(path, site="george") as ledger:
        entries = ledger.entries()
        assert [e.seq for e in entries] == [1, 2, 3, 4] and ledger.verify().ok
        assert entries[0].prev_hash == "0" * 64 and all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
        assert [e.epsilon for e in entries] == sorted(e.epsilon for e in entries)
        assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with pytest.raises(PrivacyError, match="would fall"):  # epsilon never decreases
            _spend(ledger, 0.1)
    with pytest.raises(PrivacyError, match="belongs to site 'george'"):
        PrivacyLedger.open(path, site="jackson")


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "truncate"])
def test_tampering_is_reported_and_fails_the_audit(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "ledger.sqlite"
    _true_ledger(path).close()
    assert _audit(str(path))[0] == 0

    db = sqlite3.connect(path)
    if tamper == "edit":  # a smaller spend, made to look right
        db.execute("UPDATE entries SET noise_multiplier = 3.0 WHERE seq = 2")
    elif tamper == "delete":
        db.execute("DELETE FROM entries WHERE seq = 2")
    elif tamper == "reorder":
        db.execute("UPDATE entries SET seq = -2 WHERE seq = 2")
        db.execute("UPDATE entries SET seq = 2 WHERE seq = 3")
        db.execute("UPDATE entries SET seq = 3 WHERE seq = -2")
    else:  # the newest spends removed: the chain that is left is valid, the head anchor is not
        db.execute("DELETE FROM entries WHERE seq >= 3")
    db.commit()
    db.close()

    code, output = _audit(str(path))

    assert code == 1 and "BROKEN" in output and "audit failed" in output
    expected = {"edit": "edited", "delete": "removed", "reorder": "previous-hash", "truncate": "newest entries removed"}[tamper]
    assert expected in " ".join(output.split())


def test_audit_recomputes_every_epsilon_and_writes_json_and_html(tmp_path: Path) -> None:
    _true_ledger(tmp_path / "george" / "ledger.sqlite").close()
    with PrivacyLedger.create(tmp_path / "jackson" / "ledger.sqlite", site="jackson") as other:
        _spend(other, 0.5)  # states far less than its events give
    report = tmp_path / "audit.html"

    code, output = _audit(str(tmp_path), "--json", "--html", str(report))

    assert code == 1  # jackson's stated epsilon is false
    sites = {s["site"]: s for s in json.loads(output)["sites"]}
    george, jackson = sites["george"], sites["jackson"]
    assert george["ok"] and george["runs"] == 2 and len(george["entries"]) == 4 and george["chain_ok"]
    first = george["entries"][0]
    assert {k: first[k] for k in ("noise_multiplier", "sample_rate", "steps", "delta", "accountant")} == {
        "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 4, "delta": 1e-5, "accountant": "rdp"}
    assert george["epsilon"] == pytest.approx(george["entries"][-1]["epsilon_stated"], rel=1e-9)
    assert george["remaining"] == pytest.approx(20.0 - george["epsilon"])
    assert not jackson["ok"] and jackson["chain_ok"] and "states epsilon 0.5" in " ".join(jackson["problems"])
    page = report.read_text()
    assert "data:image/png;base64," in page and "george" in page and "PROBLEMS FOUND" in page


def test_a_spend_over_the_budget_fails_the_audit(tmp_path: Path) -> None:
    with PrivacyLedger.create(tmp_path / "ledger.sqlite", site="lucas") as ledger:
        accountant = SiteAccountant(CFG.accountant)
        accountant.record(noise_multiplier=1.0, sample_rate=0.25, steps=4)
        _spend(ledger, accountant.epsilon(1e-5), budget=50)
    db = sqlite3.connect(tmp_path / "ledger.sqlite")  # a budget lowered by hand after the spend (the site refuses to write one)
    db.execute("UPDATE entries SET epsilon_budget = 0.5")
    db.commit()
    db.close()

    code, output = _audit(str(tmp_path))

    assert code == 1 and "over the budget 0.5" in " ".join(output.split())


def test_no_ledger_found_exits_2(tmp_path: Path) -> None:
    assert _audit(str(tmp_path))[0] == 2


def _round(cfg: RunConfig, policy: SitePolicy, site_data, *, run: str, server_round: int, state: SiteState | None = None):
    data, weights = site_data
    with PrivacyLedger.open(policy.ledger_path, site="george", create_if_new=True) as ledger:
        return train_round(
            cfg=cfg, site="george", data=data, global_weights=weights, server_round=server_round,
            state=state or SiteState(plan=None, accountant=SiteAccountant(cfg.accountant)), policy=policy, ledger=ledger, run_id=run,
        )


def test_the_spend_is_in_the_ledger_before_the_update_is_returned(tmp_path: Path, site_data) -> None:
    policy = SitePolicy(state_dir=tmp_path, epsilon_budget=50.0)

    update = _round(CFG, policy, site_data, run="r1", server_round=1)

    with PrivacyLedger.read(policy.ledger_path) as ledger:
        assert ledger.entries() == [update.ledger_entry] and ledger.verify().ok
    assert update.privacy is not None and update.privacy.epsilon == update.ledger_entry.epsilon
    assert update.ledger_entry.noise_multiplier == 1.0 and update.ledger_entry.run_id == "r1"


def test_spends_compose_across_runs_and_the_site_budget_is_enforced(tmp_path: Path, site_data) -> None:
    probe = SitePolicy(state_dir=tmp_path / "probe", epsilon_budget=1e9)
    per_round = _round(CFG, probe, site_data, run="p", server_round=1).privacy.epsilon
    two_rounds = _round(CFG, probe, site_data, run="p", server_round=2).privacy.epsilon
    policy = SitePolicy(state_dir=tmp_path / "site", epsilon_budget=two_rounds * 1.001)  # room for two rounds, not three

    first = _round(CFG, policy, site_data, run="run-a", server_round=1)
    second = _round(CFG, policy, site_data, run="run-b", server_round=1)  # a new run: its own plan starts at 0
    with pytest.raises(BudgetExceededError, match="lifetime epsilon .* over its budget") as refusal:
        _round(CFG, policy, site_data, run="run-c", server_round=1)

    assert first.privacy.epsilon == pytest.approx(per_round) and second.privacy.epsilon == pytest.approx(two_rounds)
    assert str(policy.ledger_path) not in str(refusal.value)  # the refusal goes to the server: no local paths
    with PrivacyLedger.read(policy.ledger_path) as ledger:
        assert [e.run_id for e in ledger.entries()] == ["run-a", "run-b"]  # the refused round spent nothing


def test_the_server_cannot_ask_for_less_noise_or_no_dp(tmp_path: Path, site_data) -> None:
    policy = SitePolicy(state_dir=tmp_path, epsilon_budget=1e9, min_noise_multiplier=1.5)
    with pytest.raises(BudgetExceededError, match="below this site's floor min-noise-multiplier=1.5"):
        _round(CFG, policy, site_data, run="r", server_round=1)
    with pytest.raises(BudgetExceededError, match="requires differential privacy"):
        _round(CFG.replace(dp=False), policy, site_data, run="r", server_round=1)
    with PrivacyLedger.read(policy.ledger_path) as ledger:
        assert ledger.entries() == []


def test_a_deployed_site_takes_its_policy_from_its_own_node_config(tmp_path: Path) -> None:
    node = {"site": "george", "state-dir": str(tmp_path), "epsilon-budget": 3, "min-noise-multiplier": 0.8}

    policy = site_policy(node, CFG.replace(target_epsilon=50.0, site_budgets="george:40"), site="george", run_id="r")

    assert policy.epsilon_budget == 3.0 and policy.min_noise_multiplier == 0.8 and policy.require_dp  # not the run config's
    assert policy.ledger_path == tmp_path.resolve() / "ledger.sqlite"
    with pytest.raises(ConfigError, match="epsilon-budget.*is required"):
        site_policy({"site": "george", "state-dir": str(tmp_path)}, CFG, site="george", run_id="r")
    with pytest.raises(ConfigError, match="state-dir.*is required"):
        site_policy({"site": "george", "epsilon-budget": 3}, CFG, site="george", run_id="r")
    # Operator finding: a misspelt policy key was ignored, and the site trained below the floor it meant to set.
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'min-noise-multipler' \(did you mean 'min-noise-multiplier'\?\)"):
        site_policy({**node, "min-noise-multipler": 50}, CFG, site="george", run_id="r")



@pytest.mark.parametrize("process", ["executor", "flwr-clientapp"])
def test_a_deployed_process_never_takes_the_simulation_policy(process: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Audit finding: a SuperNode started by hand with only partition-id (as Flower's tutorials do) got the
    simulation's policy: budgets and dp set by the server, require-dp off, ledgers in the server's run folder."""
    import fedmm.privacy.policy as policy_module

    node = {"partition-id": 0, "num-partitions": 3}
    assert site_policy(node, CFG, site="george", run_id="r").require_dp is False  # a simulation: the owner chose dp
    monkeypatch.setattr(policy_module, "_DEPLOYED_PROCESS", False)  # put back after the test (the suite simulates in-process)
    if process == "executor":  # `fedmm site`'s executor process marks itself on start
        from fedmm.runtime import executor

        monkeypatch.setattr(executor, "serve", lambda *a, **k: None)
        monkeypatch.setattr(executor.signal, "signal", lambda *a: None)
        executor.main(["--runtime-api-address", "127.0.0.1:1", "--secret-file", str(executor.make_secret(tmp_path))])
    else:
        monkeypatch.setattr(sys, "argv", ["/usr/bin/flwr-clientapp", "--insecure"])

    with pytest.raises(ConfigError, match=r"partition-id\) but no site policy.*start the SuperNode with --node-config"):
        site_policy(node, CFG, site="george", run_id="r")


_KILLER = textwrap.dedent(
    """
    # Imports once; then, 10 times, forks two site processes that contend for one ledger (each
    # round: open it, check the budget, train, append, "send") and SIGKILLs both at random moments.
    import json, os, random, signal, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from fedmm.config import RunConfig
    from fedmm.data.synthetic import make_synthetic
    from fedmm.errors import BudgetExceededError, PrivacyError
    from fedmm.models import ModelRecipe
    from fedmm.privacy.accounting import SiteAccountant
    from fedmm.privacy.audit import audit_ledger
    from fedmm.privacy.ledger import PrivacyLedger
    from fedmm.privacy.policy import SitePolicy
    from fedmm.site import SiteState, train_round

    state_dir, released, iterations, budget = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[5])
    cfg = RunConfig.from_run_config(json.loads(sys.argv[4]))
    data = make_synthetic(64, seed=0)
    recipe = ModelRecipe.from_config(cfg)
    weights = recipe.build(recipe.prepare(data).schema, seed=0).state_dict()
    policy = SitePolicy(state_dir=state_dir, epsilon_budget=budget)
    PrivacyLedger.create(policy.ledger_path, site="george").close()
    rng = random.Random(0)
    # Warm up (Opacus and torch's first step is slow) on a scratch ledger, so the forked processes round quickly.
    warm = SitePolicy(state_dir=state_dir.parent / "warm-up", epsilon_budget=1e9)
    with PrivacyLedger.create(warm.ledger_path, site="george") as scratch:
        train_round(cfg=cfg, site="george", data=data, global_weights=weights, server_round=1,
                    state=SiteState(plan=None, accountant=SiteAccountant(cfg.accountant)), policy=warm, ledger=scratch, run_id="warm")

    def site_process(run_id):
        state = SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
        for r in range(1, 10**6):
            try:
                with PrivacyLedger.open(policy.ledger_path, site="george", wait=60) as ledger:
                    update = train_round(cfg=cfg, site="george", data=data, global_weights=weights, server_round=r,
                                         state=state, policy=policy, ledger=ledger, run_id=run_id)
            except BudgetExceededError:
                time.sleep(0.01)
                continue
            with open(released, "a") as out:  # "sent": after the ledger holds the spend
                out.write(f"{update.ledger_entry.seq} {update.ledger_entry.hash}\\n")
                out.flush()
                os.fsync(out.fileno())

    for iteration in range(iterations):
        pids = []
        for worker in range(2):
            pid = os.fork()
            if pid == 0:
                try:
                    site_process(f"life-{iteration}-{worker}")
                finally:
                    os._exit(1)
            pids.append(pid)
        for pid in pids:  # two kills an iteration, each at its own random moment
            time.sleep(rng.uniform(0.1, 1.5))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        audit = audit_ledger(policy.ledger_path)
        with PrivacyLedger.read(policy.ledger_path) as ledger:
            stored = {e.seq: e.hash for e in ledger.entries()}
        sent = [line.split() for line in open(released).read().splitlines()] if os.path.exists(released) else []
        behind = [s for s, h in sent if stored.get(int(s)) != h]
        print(json.dumps({"iteration": iteration, "ok": audit.ok, "problems": audit.problems, "entries": len(stored),
                          "epsilon": audit.epsilon, "released": len(sent), "released_not_in_ledger": behind}), flush=True)
    """
)


def test_sigkill_at_random_points_while_two_processes_contend_for_one_ledger(tmp_path: Path) -> None:
    """20 SIGKILLs: the chain always verifies, no released update lacks its spend, the budget is never exceeded."""
    released = tmp_path / "released.txt"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    run_config = {"data": "synthetic", "modalities": "tabular", "batch-size": 16, "noise-multiplier": 1.0, "target-epsilon": 1e4, "rounds": 100_000}
    lifetime = SiteAccountant(CFG.accountant)
    for _ in range(30):  # a budget of 30 rounds: reached part way through, so the edge is contended
        lifetime.record(noise_multiplier=1.0, sample_rate=0.25, steps=4)
    budget = lifetime.epsilon(1e-5)

    done = subprocess.run(
        [sys.executable, "-c", _KILLER, str(tmp_path / "site"), str(released), "10", json.dumps(run_config), str(budget)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(reports) == 10
    for report in reports:
        # ok: the chain verifies, every stated epsilon is what its events give, and none is over the budget
        assert report["ok"], report
        assert report["released_not_in_ledger"] == [] and report["entries"] >= report["released"], report
        assert report["epsilon"] <= budget * (1 + 1e-6), report
    assert reports[-1]["released"] > 0  # rounds really completed between the kills
