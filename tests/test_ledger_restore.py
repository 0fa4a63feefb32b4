"""A ledger restored from an older backup: the spends made after the backup are not forgotten.

Restoring ledger.sqlite and its .head anchor from a backup (the fix for a lost ledger) gave a
pair that verified and audited ok, and the site spent again the budget it had spent since the
backup. Every spend is now also written, whole, to ledger.sqlite.spends, which a backup of the
ledger does not roll back: a ledger behind it is refused (and fails the audit) until
`fedmm ledger recover` adds the spends back; a spend log that cannot give them back names the
epsilon to carry over with `--replace-lost`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ledger_support import TABULAR, run_cli

from fedmm.errors import BudgetExceededError, PrivacyError
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.audit import audit_ledger
from fedmm.privacy.ledger import PrivacyLedger
from fedmm.privacy.policy import SitePolicy
from fedmm.site.round import SiteState, train_round

CFG = TABULAR
PAIR = ("ledger.sqlite", "ledger.sqlite.head")  # what a backup of the ledger holds


def _round(policy: SitePolicy, site_data, *, run: str, server_round: int = 1):
    data, weights = site_data
    with PrivacyLedger.open(policy.ledger_path, site="george", create_if_new=True) as ledger:
        return train_round(
            cfg=CFG, site="george", data=data, global_weights=weights, server_round=server_round,
            state=SiteState(plan=None, accountant=SiteAccountant(CFG.accountant)), policy=policy, ledger=ledger, run_id=run,
        )


def _copy(names: tuple[str, ...], source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(source / name, target / name)


def _spent_since_a_backup(tmp_path: Path, site_data, *, after: int = 4, budget: float = 1e9) -> tuple[SitePolicy, Path, list]:
    """One round, a backup of the ledger, then ``after - 1`` more rounds; the ledger lost and restored from the backup."""
    policy = SitePolicy(state_dir=tmp_path / "george", epsilon_budget=budget, fresh_state=True)
    backup = tmp_path / "backup"
    _round(policy, site_data, run="study-1")
    _copy(PAIR, policy.state_dir, backup)
    for r in range(2, after + 1):
        _round(policy, site_data, run=f"study-{r}")
    with PrivacyLedger.read(policy.ledger_path) as ledger:
        spent = ledger.entries()
    policy.ledger_path.unlink()  # lost
    _copy(PAIR, backup, policy.state_dir)  # the documented fix: restore the ledger and its anchor from a backup
    return policy, backup, spent


def test_a_ledger_restored_from_an_older_backup_is_refused_until_its_spends_are_recovered(tmp_path: Path, site_data) -> None:
    probe = SitePolicy(state_dir=tmp_path / "probe", epsilon_budget=1e9, fresh_state=True)
    four = [_round(probe, site_data, run=f"p{r}").privacy.epsilon for r in range(1, 5)][-1]
    policy, _, spent = _spent_since_a_backup(tmp_path, site_data, budget=four * 1.001)  # room for four rounds, not five
    assert spent[-1].epsilon == pytest.approx(four)

    # The site refuses it (it would re-spend what it spent since the backup): what, the values, the fix.
    with pytest.raises(PrivacyError, match=r"ends at entry 1 .* records the spends of entries 2-4 .*restored from an older backup") as err:
        _round(policy, site_data, run="study-5")
    assert f"up to epsilon {spent[-1].epsilon:.6g}" in str(err.value) and f"fedmm ledger recover {policy.state_dir} --site george" in str(err.value)
    audit = audit_ledger(policy.ledger_path)  # and the audit fails it, without a witness
    assert not audit.ok and any("entries 2-4" in p for p in audit.problems)
    with PrivacyLedger.read(policy.ledger_path) as ledger:
        assert len(ledger.entries()) == 1  # nothing written by the refusal or the audit

    code, output = run_cli("ledger", "recover", str(policy.state_dir), "--site", "george")

    assert code == 0 and "added back entries 2-4" in output, output
    with PrivacyLedger.read(policy.ledger_path) as ledger:
        assert ledger.entries() == spent  # the very entries: same hashes, so the server's witness still matches
    audit = audit_ledger(policy.ledger_path)
    assert audit.ok and audit.epsilon == pytest.approx(spent[-1].epsilon), audit.problems
    log = [json.loads(line) for line in (policy.state_dir / "ledger.sqlite.log").read_text().splitlines()]
    assert log[-1]["event"] == "recovered-from-log" and log[-1]["seqs"] == [2, 3, 4]
    with pytest.raises(BudgetExceededError, match="over its budget"):  # the budget spent since the backup stays spent
        _round(policy, site_data, run="study-5")


def test_a_ledger_one_spend_behind_its_spend_log_gets_it_back_when_the_site_opens_it(tmp_path: Path, site_data) -> None:
    policy, _, spent = _spent_since_a_backup(tmp_path, site_data, after=2)

    audit = audit_ledger(policy.ledger_path)  # what a crash between the spend log and the commit also leaves: stated
    assert audit.ok and any("tolerated: the spend log records entry 2" in note for note in audit.notes), audit.notes
    assert audit.epsilon == pytest.approx(spent[-1].epsilon)  # the headline counts it (it was the ledger's entry 1's figure)

    update = _round(policy, site_data, run="study-3")

    with PrivacyLedger.read(policy.ledger_path) as ledger:
        assert ledger.entries()[:2] == spent and ledger.entries()[2] == update.ledger_entry
    assert update.ledger_entry.epsilon > spent[-1].epsilon
    assert audit_ledger(policy.ledger_path).ok


def test_a_spend_log_that_cannot_give_the_spends_back_names_the_epsilon_to_carry_over(tmp_path: Path, site_data) -> None:
    policy, _, spent = _spent_since_a_backup(tmp_path, site_data)
    log = policy.state_dir / "ledger.sqlite.spends"
    lines = log.read_text().splitlines()
    record = json.loads(lines[2])  # entry 3's record, damaged: entries 2 and 4 no longer chain
    assert record["entry"]["seq"] == 3
    record["entry"]["noise_multiplier"] = 9.0
    lines[2] = json.dumps(record)
    log.write_text("\n".join(lines) + "\n")

    with pytest.raises(PrivacyError, match="do not continue its chain") as err:
        PrivacyLedger.open(policy.ledger_path, site="george")
    carried = f"--replace-lost --carried-epsilon {spent[-1].epsilon!r} --carried-delta 1e-05"  # exact: never rounded down
    assert carried in str(err.value) and "a backup lacks the spends made after it" in str(err.value)
    assert run_cli("ledger", "recover", str(policy.state_dir), "--site", "george")[0] == 1
    assert not audit_ledger(policy.ledger_path).ok

    policy.ledger_path.rename(policy.state_dir / "ledger.sqlite.restored")  # the fix it names: moved aside, kept
    code, _ = run_cli("ledger", "init", str(policy.state_dir), "--site", "george", *carried.split(), "--reason", "backup behind, log damaged")
    assert code == 0
    audit = audit_ledger(policy.ledger_path)  # the old ledger's logged spends are not the new one's
    assert audit.ok and audit.epsilon == spent[-1].epsilon, audit.problems


def test_a_spend_whose_commit_failed_is_cancelled_in_the_spend_log(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"

    class CommitFails:
        def __init__(self, db) -> None:
            self.db = db

        def execute(self, sql: str, *args):
            if sql == "COMMIT":
                raise OSError("disk gone")
            return self.db.execute(sql, *args)

        def __getattr__(self, name: str):
            return getattr(self.db, name)

    with PrivacyLedger.create(path, site="george") as ledger:
        ledger.append(run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5, accountant="rdp",
                      epsilon=1.0, epsilon_budget=10.0, data="d")
        ledger._db, real = CommitFails(ledger._db), ledger._db
        with pytest.raises(OSError, match="disk gone"):
            ledger.append(run_id="r", round=2, noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5, accountant="rdp",
                          epsilon=2.0, epsilon_budget=10.0, data="d")
        ledger._db = real

    events = [json.loads(line)["event"] for line in (tmp_path / "ledger.sqlite.spends").read_text().splitlines()]
    assert events == ["spend", "spend", "spend-rolled-back"]
    with PrivacyLedger.open(path, site="george") as ledger:  # nothing to add back: the failed spend never was
        assert len(ledger.entries()) == 1 and ledger.recovered == ()


@pytest.mark.parametrize("damage", ["torn", "garbled"])
def test_a_spend_log_line_that_is_not_a_whole_record_refuses_the_ledger_and_names_no_figure(tmp_path: Path, site_data, damage: str) -> None:
    """Review finding: a line that is not JSON was skipped without a word, so a ledger restored one spend behind
    took the line before it as 'a crash' and trained at the lower figure; the fix named too small an epsilon."""
    policy = SitePolicy(state_dir=tmp_path / "george", epsilon_budget=1000.0, fresh_state=True)
    _round(policy, site_data, run="r1")
    _copy(PAIR, policy.state_dir, tmp_path / "backup")
    _round(policy, site_data, run="r2")
    _round(policy, site_data, run="r3")
    spends = policy.state_dir / "ledger.sqlite.spends"
    text = spends.read_bytes()
    start = text.rstrip(b"\n").rfind(b"\n") + 1  # the newest spend's line: cut short, or its first byte changed
    spends.write_bytes(text[:-40] if damage == "torn" else text[:start] + b"#" + text[start + 1 :])
    _copy(PAIR, tmp_path / "backup", policy.state_dir)

    with pytest.raises(PrivacyError, match="is not a whole record") as refusal:
        _round(policy, site_data, run="r4")
    assert "--carried-epsilon E" in str(refusal.value) and "privacy.json" in str(refusal.value)
    assert not audit_ledger(policy.ledger_path).ok


def test_a_line_torn_by_a_crash_does_not_swallow_the_next_spend(tmp_path: Path) -> None:
    from fedmm.privacy.ledger_files import append_log, read_log

    log = tmp_path / "ledger.sqlite.spends"
    log.write_text('{"event": "spend", "seq": 1, "ent')  # a crash in the middle of a write
    append_log(log, "spend", seq=2)

    events = read_log(log)
    assert [e.get("event") for e in events] == ["unreadable", "spend"] and events[1]["seq"] == 2
