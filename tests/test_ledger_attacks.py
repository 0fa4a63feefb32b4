"""Attacks on a site's ledger by careless operators, crashes and curious servers (issue 16).

Each test reproduces what a reviewer did to the ledger of fedmm 0.1 and checks that it now
fails closed with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import asdict
from pathlib import Path

import pytest

from ledger_support import TABULAR, run_cli

from fedmm.data.synthetic import make_synthetic
from fedmm.errors import BudgetExceededError, PrivacyError
from fedmm.models import ModelRecipe
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ledger import LedgerEntry, PrivacyLedger
from fedmm.privacy.ledger_files import write_anchor
from fedmm.privacy.ledger_spends import log_spend
from fedmm.privacy.policy import SitePolicy
from fedmm.site.round import SiteState, data_digest, train_round

CFG = TABULAR


def _round(policy: SitePolicy, site_data, *, server_round: int, run: str = "r1", create_if_new: bool = True):
    data, weights = site_data
    with PrivacyLedger.open(policy.ledger_path, site="george", create_if_new=create_if_new) as ledger:
        return train_round(
            cfg=CFG, site="george", data=data, global_weights=weights, server_round=server_round,
            state=SiteState(plan=None, accountant=SiteAccountant(CFG.accountant)), policy=policy, ledger=ledger, run_id=run,
        )


def _spent_ledger(path: Path, rounds: int = 3) -> list[LedgerEntry]:
    accountant = SiteAccountant(CFG.accountant)
    with PrivacyLedger.create(path, site="george") as ledger:
        for r in range(1, rounds + 1):
            accountant.record(noise_multiplier=1.0, sample_rate=0.25, steps=4)
            ledger.append(run_id="r1", round=r, noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5, accountant="rdp",
                          epsilon=accountant.epsilon(1e-5), epsilon_budget=20.0, data="d")
        return ledger.entries()


def _witness(path: Path, entry: LedgerEntry) -> Path:
    path.write_text(json.dumps({"sites": [{"site": "george", "epsilon": entry.epsilon, "ledger_seq": entry.seq, "ledger_hash": entry.hash}]}))
    return path


# 1. A deleted ledger reset the budget.
def test_a_deleted_ledger_is_not_silently_remade(tmp_path: Path, site_data) -> None:
    policy = SitePolicy(state_dir=tmp_path / "george", epsilon_budget=50.0, fresh_state=True)
    _round(policy, site_data, server_round=1)
    policy.ledger_path.unlink()  # rm <state-dir>/ledger.sqlite; the anchor and the log stay

    with pytest.raises(PrivacyError, match="is missing, but ledger.sqlite.head, ledger.sqlite.log .* refuses to start a new one") as err:
        _round(policy, site_data, server_round=2)

    assert "--replace-lost --carried-epsilon" in str(err.value) and not policy.ledger_path.exists()
    assert run_cli("ledger", "init", str(policy.state_dir), "--site", "george")[0] == 1  # nor by the plain init command


def test_a_site_without_a_ledger_is_told_to_make_one_explicitly(tmp_path: Path, site_data) -> None:
    policy = SitePolicy(state_dir=tmp_path / "george", epsilon_budget=50.0)  # a deployed site (or a lasting folder)

    with pytest.raises(PrivacyError, match=r"no privacy ledger .* Fix: run `fedmm ledger init .*george --site george`"):
        _round(policy, site_data, server_round=1, create_if_new=False)

    code, output = run_cli("ledger", "init", str(policy.state_dir), "--site", "george")
    assert code == 0 and "new ledger" in output
    assert _round(policy, site_data, server_round=1, create_if_new=False).ledger_entry.seq == 1
    log = [json.loads(line) for line in (policy.state_dir / "ledger.sqlite.log").read_text().splitlines()]
    assert [e["event"] for e in log] == ["created"] and log[0]["site"] == "george" and log[0]["user"]


def test_a_ledger_lost_for_good_is_replaced_only_with_its_spend_carried_over(tmp_path: Path, site_data) -> None:
    # the site states its spends at delta 5e-6, so its own and the carried delta (1e-6) fit under the run's target-delta 1e-5
    policy = SitePolicy(state_dir=tmp_path / "george", epsilon_budget=10.0, delta=5e-6, fresh_state=True)
    spent = _round(policy, site_data, server_round=1).privacy.epsilon
    policy.ledger_path.unlink()

    code, output = run_cli("ledger", "init", str(policy.state_dir), "--site", "george", "--replace-lost", "--carried-epsilon", "9.9",
                        "--carried-delta", "1e-6", "--reason", "disk failure, no backup")
    assert code == 0 and "carrying epsilon 9.9" in output
    with pytest.raises(BudgetExceededError, match="carried over"):  # 9.9 + one more round is over 10
        _round(policy, site_data, server_round=2)
    assert spent < 9.9
    code, output = run_cli("audit", str(policy.state_dir), "--json")
    audit = json.loads(output)["sites"][0]
    assert audit["epsilon"] == pytest.approx(9.9) and "lost for good" in " ".join(audit["notes"])


def test_a_replaced_ledger_whose_delta_the_run_cannot_take_refuses_before_it_spends(tmp_path: Path, site_data) -> None:
    """Audit finding: the carried delta made every report weaker than target-delta; the server left each update
    out and kept asking, so the site spent every round with no spend on the server's record."""
    policy = SitePolicy(state_dir=tmp_path / "george", epsilon_budget=10.0, fresh_state=True)
    assert run_cli("ledger", "init", str(policy.state_dir), "--site", "george", "--replace-lost", "--carried-epsilon", "1",
                "--carried-delta", "1e-5", "--reason", "disk failure, no backup")[0] == 0

    with pytest.raises(BudgetExceededError, match=r"delta 2e-05 \(1e-05 of its own \+ 1e-05 carried .* Fix: leave this site out: its carried delta alone reaches"):
        _round(policy, site_data, server_round=1)
    with PrivacyLedger.open(policy.ledger_path, site="george") as ledger:
        assert ledger.entries() == []  # refused before any spend


# 2. Two site processes on one state dir overspent.
def test_one_process_per_ledger_and_the_other_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger.create(path, site="george"):
        with pytest.raises(PrivacyError, match=rf"in use by another process \(pid {os.getpid()},.*only one process may check a site's budget"):
            PrivacyLedger.open(path, site="george", wait=0.2)
        with pytest.raises(PrivacyError, match="in use by another process"):  # not sqlite's "database is locked"
            PrivacyLedger.create(tmp_path / "ledger.sqlite", site="george")
    PrivacyLedger.open(path, site="george", wait=0.2).close()  # free again once the holder closes


# 3. The anchor tolerance hid a removed newest entry; a consistent rewrite passed the audit.
def test_a_removed_newest_entry_with_its_anchor_is_stated_and_caught_by_the_witness(tmp_path: Path) -> None:
    path = tmp_path / "george" / "ledger.sqlite"
    entries = _spent_ledger(path)
    witness = _witness(tmp_path / "privacy.json", entries[-1])
    db = sqlite3.connect(path)
    db.execute("DELETE FROM entries WHERE seq = 3")
    db.commit()
    db.close()
    write_anchor(path.with_name("ledger.sqlite.head"), 1, entries[0].hash)  # the anchor one behind, as after a crash

    code, output = run_cli("audit", str(path))
    assert code == 0 and "tolerated: the head anchor is one entry behind" in output and "only a witness" in output

    code, output = run_cli("audit", str(path), "--witness", str(witness))
    assert code == 1 and "recorded this site's ledger head as entry 3" in output


def test_a_consistently_rewritten_chain_fails_against_the_witness(tmp_path: Path) -> None:
    path = tmp_path / "george" / "ledger.sqlite"
    entries = _spent_ledger(path)
    witness = _witness(tmp_path / "privacy.json", entries[-1])
    # The rewrite: noise x10 (a smaller spend), epsilons recomputed, every hash redone, a new anchor.
    accountant, prev, forged = SiteAccountant(CFG.accountant), "0" * 64, []
    for e in entries:
        accountant.record(noise_multiplier=10.0, sample_rate=e.sample_rate, steps=e.steps)
        draft = LedgerEntry(**{**asdict(e), "noise_multiplier": 10.0, "epsilon": accountant.epsilon(1e-5), "prev_hash": prev, "hash": ""})
        forged.append(LedgerEntry(**{**asdict(draft), "hash": draft.expected_hash()}))
        prev = forged[-1].hash
    db = sqlite3.connect(path)
    db.executemany("UPDATE entries SET noise_multiplier = ?, epsilon = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                   [(f.noise_multiplier, f.epsilon, f.prev_hash, f.hash, f.seq) for f in forged])
    db.commit()
    db.close()
    write_anchor(path.with_name("ledger.sqlite.head"), forged[-1].seq, forged[-1].hash)

    code, output = run_cli("audit", str(path))  # the spend log, written before each commit, still has the true spends
    assert code == 1 and "the ledger or its spend log was rewritten after the spend" in output
    spends = path.with_name("ledger.sqlite.spends")
    spends.unlink()  # a spend log removed shows: each entry was logged before it committed
    code, output = run_cli("audit", str(path))
    assert code == 1 and "lacks entries 1-3" in output
    reader = PrivacyLedger.read(path)
    for f in forged:  # the rewrite done thoroughly: a spend log forged to match
        log_spend(spends, reader.ledger_id, f)
    reader.close()
    assert run_cli("audit", str(path))[0] == 0  # self-consistent: only a witness held elsewhere can tell
    code, output = run_cli("audit", str(path), "--witness", str(witness))
    assert code == 1 and "rewritten or cut" in output


# 4. fedmm audit wrote to what it audited.
@pytest.mark.parametrize("kind", ["other-schema", "empty-file", "text-noise"])
def test_the_audit_reads_only_and_refuses_what_is_not_a_ledger(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ledger.sqlite"
    if kind == "other-schema":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE patients (name TEXT, diagnosis TEXT)")
        db.execute("INSERT INTO patients VALUES ('x', 'y')")
        db.commit()
        db.close()
    elif kind == "empty-file":
        path.write_bytes(b"")
    else:
        _spent_ledger(path)
        db = sqlite3.connect(path)
        db.execute("UPDATE entries SET noise_multiplier = 'lots' WHERE seq = 2")
        db.commit()
        db.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    code, output = run_cli("audit", str(path))

    assert code == 1 and "Traceback" not in output
    expected = {"other-schema": "is not a fedmm privacy ledger: its tables are ['patients']", "empty-file": "is not a fedmm privacy ledger: its tables are none",
                "text-noise": "field noise_multiplier holds 'lots', not a number"}[kind]
    assert expected in output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, no -wal, no tables added


# 5. The ledger hash sent to the server identified the dataset.
def test_the_ledger_head_the_server_sees_cannot_be_matched_against_candidate_datasets(tmp_path: Path, site_data) -> None:
    policy = SitePolicy(state_dir=tmp_path / "george", epsilon_budget=50.0, fresh_state=True)
    entry = _round(policy, site_data, server_round=1).ledger_entry
    data, _ = site_data
    recipe = ModelRecipe.from_config(CFG)
    trained_on = recipe.prepare(data).labelled()

    # The server's guess: every field it knows (or can enumerate), and the digest of its candidate dataset.
    unkeyed = hashlib.sha256()
    for name in trained_on.schema.names:
        unkeyed.update(name.encode())
        unkeyed.update(trained_on.features[name].tobytes())
    unkeyed.update(trained_on.label.tobytes())
    guess = LedgerEntry(**{**asdict(entry), "data": unkeyed.hexdigest()[:16], "hash": ""})

    assert guess.expected_hash() != entry.hash
    with PrivacyLedger.read(policy.ledger_path) as ledger:
        key = ledger.data_key
    assert entry.data == data_digest(trained_on, key) != data_digest(trained_on, b"another site's key")
    assert len(key) == 32


def test_a_site_does_not_spend_on_top_of_a_ledger_that_lost_entries(tmp_path: Path) -> None:
    """Review finding: with every entry deleted, open() saw no history and the next append rewrote the anchor."""
    path = tmp_path / "george" / "ledger.sqlite"
    _spent_ledger(path)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM entries")
    db.commit()
    db.close()

    with pytest.raises(PrivacyError, match="does not verify .*newest entries removed.*refuses to train on it"):
        PrivacyLedger.open(path, site="george")


def test_a_node_with_its_own_policy_is_never_taken_for_a_simulated_site(tmp_path: Path) -> None:
    """Review finding: partition-id in a deployed node's config gave it the server's policy; run ids named folders."""
    from fedmm.errors import ConfigError
    from fedmm.privacy.policy import site_policy

    node = {"partition-id": 0, "epsilon-budget": 3.0, "site": "george"}  # a hand-started SuperNode, Flower's usual config
    with pytest.raises(ConfigError, match="state-dir.*is required"):
        site_policy(node, CFG, site="george", run_id="r1")
    with pytest.raises(ConfigError, match="run id.*plain name"):
        site_policy({"partition-id": 0}, CFG, site="george", run_id="../../../tmp/evil")


def test_the_carried_spend_of_a_lost_ledger_cannot_be_deleted_quietly(tmp_path: Path) -> None:
    """Review finding: the carried spend lived in unhashed meta; removing it regained the lost budget."""
    state = tmp_path / "george"
    spent = _spent_ledger(state / "ledger.sqlite")[-1].epsilon
    (state / "ledger.sqlite").unlink()
    assert run_cli("ledger", "init", str(state), "--site", "george", "--replace-lost", "--carried-epsilon", repr(spent),
                "--carried-delta", "1e-5", "--reason", "disk failure")[0] == 0
    db = sqlite3.connect(state / "ledger.sqlite")
    db.execute("DELETE FROM meta WHERE key LIKE 'carried_%'")
    db.commit()
    db.close()

    with pytest.raises(PrivacyError, match="the carried spend was changed or removed"):
        PrivacyLedger.open(state / "ledger.sqlite", site="george")
    code, output = run_cli("audit", str(state))
    assert code == 1 and "carried spend was changed or removed" in output


def test_the_data_digest_is_kept_per_dataset_and_key_and_a_changed_dataset_gets_its_own() -> None:
    # A site's data is digested once (the digest is then reused each round); a kept digest must never stand for other data.
    data = make_synthetic(40, seed=3)
    assert data.labelled() is data  # every record labelled: the same frozen arrays, not a copy each round
    first = data_digest(data, b"k" * 32)
    assert data_digest(data, b"k" * 32) == first != data_digest(data, b"j" * 32)
    fewer = data.subset(range(39))
    assert data_digest(fewer, b"k" * 32) != first
    fresh = data.subset(range(40))  # equal content, another object: the same digest, computed anew
    assert data_digest(fresh, b"k" * 32) == first


def test_a_refusal_states_the_spend_a_replaced_ledger_carries(tmp_path: Path) -> None:
    """Privacy-officer finding: a replaced ledger's refusal said 'epsilon spent 0.000', leaving out the carried spend."""
    from fedmm import protocol
    from fedmm.plan import RunPlan
    from fedmm.privacy.ledger import CarriedSpend
    from fedmm.site.data import site_data as load_site_data
    from fedmm.site.io import RoundRequest
    from fedmm.site.runner import run_round

    state = tmp_path / "site-0"
    PrivacyLedger.create(state / "ledger.sqlite", site="0", reason="disk failure", carried=CarriedSpend(5.0, 0.0, "disk failure")).close()
    run = {"data": "synthetic:60", "rounds": 3, "sites": 1, "batch-size": 16, "target-epsilon": 8.0}
    node = {protocol.NODE_SITE: "0", protocol.NODE_STATE_DIR: str(state), protocol.NODE_EPSILON_BUDGET: 5.5}
    plan = RunPlan.from_run_config(run)
    schema = plan.model.prepare(load_site_data(node, plan.config)[1]).schema
    weights = {k: v.numpy() for k, v in plan.model.build(schema).state_dict().items()}

    response = run_round(RoundRequest(run_config=dict(run), node_config=node, global_weights=weights, saved_state=None, node_id=7,
                                      config={protocol.SERVER_ROUND: 1, protocol.SCHEMA: schema.to_json(), protocol.RUN_ID: "study-1"}))

    assert response.refused is not None and "epsilon-budget=5.5" in response.refused and response.spent == 5.0  # the carried spend counts


def test_a_site_audits_its_own_ledger_against_a_witness_that_names_others_too(tmp_path: Path) -> None:
    """Operator finding: `fedmm audit state/jackson --witness privacy.json` always failed, with a garbled path, for the
    other sites the witness names."""
    path = tmp_path / "george" / "ledger.sqlite"
    entries = _spent_ledger(path)
    record = json.loads(_witness(tmp_path / "privacy.json", entries[-1]).read_text())
    record["sites"].append({"site": "jackson", "epsilon": 1.0, "ledger_seq": 1, "ledger_hash": "0" * 64})
    (tmp_path / "privacy.json").write_text(json.dumps(record))

    code, output = run_cli("audit", str(path), "--witness", str(tmp_path / "privacy.json"))
    assert code == 1 and "names site 'jackson', whose ledger was not given" in output and "--given-only" in output
    assert run_cli("audit", str(path), "--witness", str(tmp_path / "privacy.json"), "--given-only")[0] == 0


# Review of 3 Dec: the lock file stays on disk after every run, and removing a "stale" one is an operator's habit. Removed
# while a site ran, a second process opened the ledger too; both passed the budget check on the same entries and both spent.
def _next_spend(ledger: PrivacyLedger, **extra: object) -> LedgerEntry:
    accountant = SiteAccountant(CFG.accountant, ledger.events())
    epsilon = accountant.projected_epsilon(1e-5, noise_multiplier=1.0, sample_rate=0.25, steps=4)
    return ledger.append(run_id="r2", round=1, noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5, accountant="rdp",
                         epsilon=epsilon, epsilon_budget=20.0, data="d", **extra)  # type: ignore[arg-type]


def test_a_removed_lock_file_lets_no_second_process_spend_beside_the_first(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    _spent_ledger(path, rounds=1)
    first = PrivacyLedger.open(path, site="george")
    try:
        path.with_name("ledger.sqlite.lock").unlink()
        with PrivacyLedger.open(path, site="george", wait=0.2) as second:  # a new lock file: the second process gets it
            with pytest.raises(PrivacyError, match=r"lock file .*ledger.sqlite.lock was removed or replaced .* nothing was spent.*Fix: stop"):
                _next_spend(first)
            _next_spend(second)
        assert len(PrivacyLedger.read(path).entries()) == 2  # one spend, not two
    finally:
        first.close()


def test_a_spend_whose_budget_check_saw_an_older_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    _spent_ledger(path, rounds=2)
    with PrivacyLedger.open(path, site="george") as ledger:
        with pytest.raises(PrivacyError, match=r"budget check saw the ledger at entry 1, it is at entry 2 now; nothing was spent"):
            _next_spend(ledger, follows=1)
        assert _next_spend(ledger, follows=2).seq == 3


def test_a_lock_knows_when_its_file_was_removed_or_replaced(tmp_path: Path) -> None:
    from fedmm.holder_lock import HolderLock

    path = tmp_path / "x.lock"
    lock = HolderLock(path)
    assert lock.still_held()
    path.unlink()
    assert not lock.still_held()
    path.write_text("{}")  # another file at the same name
    assert not lock.still_held()
    lock.release()
    assert not lock.still_held()


# Review of 3 Dec: a fresh ledger of the same site, made elsewhere with `fedmm ledger init` and copied over the site's
# ledger and anchor (the obvious way round init's refusal to make one in place), opened at epsilon 0: budget reset.
def _fresh_ledger_copied_over(state: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "ledger.sqlite"
    PrivacyLedger.create(other, site="george").close()
    for name in ("ledger.sqlite", "ledger.sqlite.head"):
        (state / name).write_bytes(other.with_name(name).read_bytes())


def test_another_ledger_copied_over_the_sites_does_not_reset_its_budget(tmp_path: Path) -> None:
    state = tmp_path / "george"
    _spent_ledger(state / "ledger.sqlite")
    _fresh_ledger_copied_over(state, tmp_path)
    with pytest.raises(PrivacyError, match=r"spend log .* records the spends of another ledger .*up to epsilon .*this ledger carries none"):
        PrivacyLedger.open(state / "ledger.sqlite", site="george").close()
    assert not PrivacyLedger.read(state / "ledger.sqlite").verify().ok  # and the audit fails it


def test_another_ledger_copied_over_the_sites_is_refused_without_its_spend_log_too(tmp_path: Path) -> None:
    state = tmp_path / "george"
    _spent_ledger(state / "ledger.sqlite")
    _fresh_ledger_copied_over(state, tmp_path)
    (state / "ledger.sqlite.spends").unlink()
    with pytest.raises(PrivacyError, match=r"is not the ledger this folder's log records as made here .*Fix: put back"):
        PrivacyLedger.open(state / "ledger.sqlite", site="george").close()


@pytest.mark.parametrize("mark_removed", [False, True], ids=["as-restored", "spends-from-mark-removed"])
def test_an_older_backup_restored_with_the_spend_log_removed_is_refused(tmp_path: Path, mark_removed: bool) -> None:
    """Review of 3 Dec (the second case): deleting meta's spends_from (outside the hash chain) made a ledger pass for one
    older than the spend log, so a restored backup with its spend log removed opened behind, its budget rolled back."""
    state = tmp_path / "george"
    _spent_ledger(state / "ledger.sqlite", rounds=1)
    backup = {name: (state / name).read_bytes() for name in ("ledger.sqlite", "ledger.sqlite.head")}
    with PrivacyLedger.open(state / "ledger.sqlite", site="george") as ledger:
        _next_spend(ledger)
        _next_spend(ledger)
    (state / "ledger.sqlite.spends").unlink()
    for name, data in backup.items():
        (state / name).write_bytes(data)
    if mark_removed:
        db = sqlite3.connect(state / "ledger.sqlite")
        db.execute("DELETE FROM meta WHERE key = 'spends_from'")
        db.commit()
        db.close()
    with pytest.raises(PrivacyError, match=r"spend log .* lacks entry 1 of the ledger"):
        PrivacyLedger.open(state / "ledger.sqlite", site="george").close()


def test_a_replacement_that_carries_the_logged_spend_opens(tmp_path: Path) -> None:
    state = tmp_path / "george"
    entries = _spent_ledger(state / "ledger.sqlite")
    (state / "ledger.sqlite").unlink()
    too_little = run_cli("ledger", "init", str(state), "--site", "george", "--replace-lost", "--carried-epsilon", "0.5",
                         "--carried-delta", "1e-5", "--reason", "disk failure")
    assert too_little[0] != 0 and f"up to epsilon {entries[-1].epsilon:.6g}" in too_little[1] and not (state / "ledger.sqlite").exists()
    assert run_cli("ledger", "init", str(state), "--site", "george", "--replace-lost", "--carried-epsilon", repr(entries[-1].epsilon),
                   "--carried-delta", "1e-5", "--reason", "disk failure")[0] == 0
    with PrivacyLedger.open(state / "ledger.sqlite", site="george") as ledger:
        assert ledger.carried is not None and ledger.entries() == []


def test_a_ledger_older_than_the_mark_is_held_to_its_spend_log_from_its_first_logged_entry(tmp_path: Path) -> None:
    path = tmp_path / "george" / "ledger.sqlite"
    _spent_ledger(path, rounds=3)
    lines = path.with_name("ledger.sqlite.spends").read_text().splitlines()
    path.with_name("ledger.sqlite.spends").write_text("\n".join(lines[1:]) + "\n")  # entry 1 predates the spend log
    db = sqlite3.connect(path)
    db.execute("DELETE FROM meta WHERE key = 'spends_from'")  # a ledger made before the mark: no mark, and a log that
    db.commit()  # does not name it (the lines of that time had no ledger id)
    db.close()
    log = path.with_name("ledger.sqlite.log")
    log.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "ledger"}) + "\n" for line in log.read_text().splitlines()))
    with PrivacyLedger.open(path, site="george") as ledger:  # its unlogged first entry is tolerated, once, and marked
        _next_spend(ledger)
    path.with_name("ledger.sqlite.spends").unlink()
    with pytest.raises(PrivacyError, match=r"lacks entries 2-4 \(3\)"):
        PrivacyLedger.open(path, site="george").close()


def test_the_audit_of_a_folder_counts_a_site_whose_ledger_was_removed(tmp_path: Path) -> None:
    """New-user finding of 3 Dec: with one site's ledger.sqlite removed, `fedmm audit runs/X/sites` left the site out and
    said "every ledger intact and within budget" (exit 0)."""
    _spent_ledger(tmp_path / "sites" / "george" / "ledger.sqlite")
    PrivacyLedger.create(tmp_path / "sites" / "jackson" / "ledger.sqlite", site="jackson").close()
    (tmp_path / "sites" / "jackson" / "ledger.sqlite").unlink()
    code, output = run_cli("audit", str(tmp_path / "sites"))
    assert code == 1 and "audit failed" in output
    assert "show that site jackson's ledger existed" in " ".join(output.split())
    witness = tmp_path / "privacy.json"  # a witness that names it: its row says it has no ledger, not "not named"
    witness.write_text(json.dumps({"sites": [{"site": "jackson", "epsilon": 1.0, "ledger_seq": 1, "ledger_hash": "0" * 64}]}))
    code, output = run_cli("audit", str(tmp_path / "sites"), "--witness", str(witness), "--given-only")
    assert code == 1 and "no ledger" in output and "not named" in output  # george is not named by it


def test_the_audit_says_what_the_witness_showed(tmp_path: Path) -> None:
    """New-user findings of 3 Dec: a passing --witness audit never named the witness; a site the witness names but
    whose ledger was not given was shown at a made-up path; a site whose head the witness contradicts read "intact"."""
    path = tmp_path / "george" / "ledger.sqlite"
    entries = _spent_ledger(path)
    witness = _witness(tmp_path / "privacy.json", entries[-1])
    code, output = run_cli("audit", str(path), "--witness", str(witness))
    assert code == 0 and "witness" in output and "matches" in output

    record = json.loads(witness.read_text())
    record["sites"].append({"site": "jackson", "epsilon": 1.0, "ledger_seq": 1, "ledger_hash": "0" * 64})
    record["sites"][0]["ledger_hash"] = "f" * 64
    witness.write_text(json.dumps(record))
    code, output = run_cli("audit", str(path), "--witness", str(witness))
    assert code == 1 and "(no ledger given" not in output and os.getcwd() not in output  # no made-up path
    assert "DIFFERS" in output


def test_the_plan_does_not_take_a_site_whose_ledger_was_removed_for_a_fresh_one(tmp_path: Path) -> None:
    """New-user finding of 3 Dec: with a lasting site-state-dir, `fedmm plan` showed such a site as fresh ("all" rounds,
    1 study) though it had spent its budget; `fedmm simulate` found out only in round 1, inside a Flower traceback."""
    _spent_ledger(tmp_path / "state" / "0" / "ledger.sqlite")
    (tmp_path / "state" / "0" / "ledger.sqlite").unlink()
    code, output = run_cli("plan", "--set", "data=synthetic:60", "--set", "sites=1", "--set", "rounds=2",
                           "--set", f"site-state-dir={tmp_path / 'state'}")
    assert code != 0 and "the privacy ledger" in output and "is missing" in output and "fedmm ledger init" in output


def test_a_misspelt_site_in_site_budgets_is_refused_not_left_at_the_default(tmp_path: Path) -> None:
    """New-user finding of 3 Dec: site-budgets="clinc0:2" ran clinic0 at budget 8, without a word."""
    code, output = run_cli("plan", "--set", "data=synthetic:60", "--set", "sites=2", "--set", "rounds=2", "--set", "site-budgets=O:2")
    assert code == 2 and "config key 'site-budgets': names site 'O', which is not a site of this federation" in output
    assert run_cli("plan", "--set", "data=synthetic:60", "--set", "sites=2", "--set", "rounds=2", "--set", "site-budgets=0:2")[0] == 0


def test_a_stopped_run_states_the_spends_its_sites_ledgers_hold_that_the_server_never_heard_of(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """New-user finding of 3 Dec: Ctrl-C in round 1 printed "privacy spent so far: no site reported a spend", while two
    sites' ledgers held this run's spends (made before their updates left, which the server never received)."""
    from fedmm.cli.run import _print_spends

    run_dir = tmp_path / "runs" / "r1"
    entries = _spent_ledger(run_dir / "sites" / "george" / "ledger.sqlite", rounds=1)  # run id "r1"
    (run_dir / "privacy.json").write_text(json.dumps({"sites": []}))
    _print_spends(run_dir, "privacy spent so far")
    said = " ".join(capsys.readouterr().out.split())
    assert f"privacy spent so far: george epsilon {entries[-1].epsilon:.3f}" in said and "the server heard of 0 of them" in said


def test_a_target_delta_not_below_one_over_a_sites_records_is_refused() -> None:
    """New-user finding of 3 Dec: target-delta=0.3 with 20 records a site planned and ran without a word."""
    code, output = run_cli("plan", "--set", "data=synthetic:60", "--set", "sites=2", "--set", "rounds=2", "--set", "target-delta=0.3")
    assert code == 2 and "config key 'target-delta': is not below 1/n for a site of" in output and "Fix: use a delta well below" in output


def test_a_stray_rolled_back_line_in_the_spend_log_is_not_a_crash(tmp_path: Path) -> None:
    """Review of 3 Dec: a 'spend-rolled-back' line without a hash, for a spend never logged, crashed open and audit (KeyError)."""
    path = tmp_path / "ledger.sqlite"
    PrivacyLedger.create(path, site="george").close()
    with open(path.with_name("ledger.sqlite.spends"), "a") as log:
        log.write(json.dumps({"event": "spend-rolled-back", "ledger": "other", "seq": 3}) + "\n")
    PrivacyLedger.open(path, site="george").close()
    from fedmm.privacy.audit import audit_ledger

    assert audit_ledger(path).ok


def test_the_spends_printed_after_a_stop_count_a_replaced_ledgers_carried_spend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmm.cli.run import _print_spends
    from fedmm.privacy.ledger import CarriedSpend

    run_dir = tmp_path / "runs" / "r1"
    path = run_dir / "sites" / "george" / "ledger.sqlite"
    with PrivacyLedger.create(path, site="george", reason="disk failure", carried=CarriedSpend(5.0, 1e-6, "disk failure")) as ledger:
        ledger.append(run_id="r1", round=1, noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5, accountant="rdp",
                      epsilon=1.0, epsilon_budget=20.0, data="d")
    _print_spends(run_dir, "privacy spent so far")
    assert "george epsilon 6.000 (lifetime" in " ".join(capsys.readouterr().out.split())
