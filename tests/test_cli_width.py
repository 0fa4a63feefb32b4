"""Tables at 80 columns: no line over 80, no value cut to an ellipsis, data printed literally (issue 19).

Also ``fedmm plan``'s ``studies`` column: whole studies of a plan a site's lifetime budget allows.
"""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from fedmm.cli import app

NARROW = {"COLUMNS": "80", "LINES": "50"}
ODD = "[bold]x[/bold]:AB:"  # markup and an emoji code, as a site or class name


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env=NARROW)
    assert result.exit_code == 0, result.output
    return result.output


def _narrow(output: str) -> None:
    long = [line for line in output.splitlines() if len(line) > 80]
    assert not long, "lines over 80 columns:\n" + "\n".join(long)
    assert "…" not in output


def test_the_console_renders_at_80_columns() -> None:
    from fedmm.cli.common import console

    runner_width = CliRunner().invoke(app, ["certs", "show", "/no/such/folder"], env=NARROW)
    assert console.width == 80, runner_width.output


def test_certs_show_keeps_every_fingerprint_whole(tmp_path: Path) -> None:
    from fedmm.secure import certs

    _run("certs", "init", str(tmp_path))
    _run("certs", "site", str(tmp_path), "george")
    out = _run("certs", "show", str(tmp_path))
    _narrow(out)
    fingerprints = [e["sha256"] for e in certs.describe(tmp_path) if e.get("sha256")]
    assert fingerprints and all(":" in f for f in fingerprints)
    joined = re.sub(r"\s+", "", out)  # a value folded over lines is one run of characters again
    for fingerprint in fingerprints:
        assert fingerprint in joined


def test_audit_prints_a_site_name_literally(tmp_path: Path) -> None:
    from fedmm.privacy.accounting import SiteAccountant
    from fedmm.privacy.ledger import PrivacyLedger

    _run("ledger", "init", str(tmp_path / "s"), "--site", ODD)
    ledger = PrivacyLedger.open(tmp_path / "s" / "ledger.sqlite")
    accountant = SiteAccountant("rdp")
    accountant.record(noise_multiplier=1.0, sample_rate=0.25, steps=4)
    ledger.append(run_id="r1", round=1, noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5, accountant="rdp",
                  epsilon=accountant.epsilon(1e-5), epsilon_budget=8.0, data="d")
    ledger.close()
    out = _run("audit", str(tmp_path / "s"))
    _narrow(out)
    assert ODD in out
    assert "intact" in out and "2" in out


def test_data_check_prints_class_and_site_names_literally(tmp_path: Path) -> None:
    rows = ["text,label,site"] + [f"note {i},{ODD if i % 2 else 'plain'},{ODD if i < 3 else 'b'}" for i in range(6)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    out = _run("data", "check", str(tmp_path / "m.csv"))
    _narrow(out)
    assert f"class {ODD}" in out and f"site={ODD}" in re.sub(r"\s+", "", out)


def test_plan_at_80_columns_counts_the_studies_each_budget_allows() -> None:
    out = _run("plan", "--set", "data=synthetic:300", "--set", "sites=3", "--set", "rounds=2", "--set", "site-budgets=0:8,*:17")
    _narrow(out)
    header = next(line for line in out.splitlines() if line.startswith("site "))
    assert header.split()[-1] == "studies"
    studies = {line.split()[0]: line.split()[-1] for line in out.splitlines() if re.match(r"^[0-2] ", line)}
    assert studies == {"0": "1", "1": "3", "2": "3"}, out
    assert "site 0's lifetime budget epsilon 8 fits 1 whole study" in re.sub(r"\s+", " ", out)
    assert "site 1's" not in out


def test_studies_count_what_the_ledger_already_holds() -> None:
    from fedmm.cli.studies import studies_allowed
    from fedmm.config import RunConfig
    from fedmm.privacy.accounting import PrivacyEvent, SiteAccountant
    from fedmm.site.round import SitePlan

    cfg = RunConfig.from_run_config({"rounds": 4})
    plan = SitePlan(100, 0.1, 10, 1.0, 0.0)
    one = SiteAccountant(cfg.accountant)
    one.record(noise_multiplier=1.0, sample_rate=0.1, steps=40)
    study = one.epsilon(cfg.target_delta)
    three = SiteAccountant(cfg.accountant)
    three.record(noise_multiplier=1.0, sample_rate=0.1, steps=120)
    four = SiteAccountant(cfg.accountant)
    four.record(noise_multiplier=1.0, sample_rate=0.1, steps=160)
    budget = (three.epsilon(cfg.target_delta) + four.epsilon(cfg.target_delta)) / 2
    assert studies_allowed(cfg, plan, budget).count == 3
    assert studies_allowed(cfg, plan, study * 1.01).count == 1
    assert studies_allowed(cfg, plan, study * 0.99).count == 0
    spent = [PrivacyEvent(1.0, 0.1, 40)]  # one study already in the ledger
    assert studies_allowed(cfg, plan, budget, history=spent).count == 2


def test_plan_counts_the_rounds_a_lasting_ledger_still_allows(tmp_path: Path) -> None:
    """Review finding: with a lasting site-state-dir, `fedmm plan` said a site could take every round
    although its ledger had already spent most of its budget (the run then stopped early)."""
    from fedmm.config import AccountantKind
    from fedmm.privacy.accounting import SiteAccountant
    from fedmm.privacy.ledger import PrivacyLedger

    keys = ["plan", "--set", "data=synthetic:300", "--set", "sites=3", "--set", "rounds=4", "--set", "target-epsilon=4",
            "--set", f"site-state-dir={tmp_path}", "--set", "site-budgets=*:8"]
    for site in ("0", "1", "2"):
        PrivacyLedger.create(tmp_path / site / "ledger.sqlite", site=site).close()
    def rounds(out: str) -> dict[str, str]:  # site -> its "rounds" cell (columns: site records q steps noise epsilon budget rounds studies)
        return {cells[0]: " ".join(cells[7:-1]) for line in out.splitlines() if re.match(r"^[0-2] ", line) for cells in [line.split()]}

    assert rounds(_run(*keys)) == {"0": "all 4", "1": "all 4", "2": "all 4"}

    accountant = SiteAccountant(AccountantKind.RDP)
    accountant.record(noise_multiplier=1.2, sample_rate=0.2, steps=40)
    spent = accountant.epsilon(1e-5)
    assert 6 < spent < 8
    with PrivacyLedger.open(tmp_path / "0" / "ledger.sqlite", site="0") as ledger:
        ledger.append(run_id="earlier", round=1, noise_multiplier=1.2, sample_rate=0.2, steps=40, delta=1e-5, accountant="rdp",
                      epsilon=spent, epsilon_budget=8.0, data="d")
    out = _run(*keys)
    _narrow(out)
    left = rounds(out)
    assert left["1"] == left["2"] == "all 4" and left["0"].isdigit() and int(left["0"]) < 4, out
    assert f"site 0 has already spent epsilon {spent:.3f} of its lifetime budget 8" in re.sub(r"\s+", " ", out), out
