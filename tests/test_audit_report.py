"""``fedmm audit --html``: the audit page for a data-protection officer, on real ledgers, in headless Chromium.

Three sites' ledgers are made with :meth:`PrivacyLedger.create` and real spends (each stated
epsilon is what Opacus' RDP accountant gives, as in ``tests/test_ledger.py``), on a clock set
by the test so that the spends lie hours and days apart: ``north`` misses round 3 of its first
run and its ledger is then edited (a larger noise multiplier in entry 2, so its events give less
than it states); ``east`` and ``west <b>`` spend exactly the same and have 0.004 epsilon left.
The page is written by ``fedmm audit --html`` and loaded in Debian's Chromium with the harness
of ``tests/test_report.py`` (imported, not copied). ``FEDMM_AUDIT_SCREENSHOT=FILE`` keeps the
screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_report import Browser, _chromium, _colours
from typer.testing import CliRunner

from fedmm.cli import app
from fedmm.config import AccountantKind
from fedmm.privacy import ledger as ledger_module
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.audit import audit_ledger
from fedmm.privacy.audit_report import render_html
from fedmm.privacy.ledger import PrivacyLedger

START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
NORTH, EAST, WEST = "north", "east", "west <b>"
RUNS = {"r-1102": (0, [1, 2, 3, 4, 5]), "r-1109": (7, [1, 2])}  # run: (start day, rounds)


def _spends(path: Path, site: str, plan: dict[str, list[int]], clock: list[datetime], *, budget: float | None = None, left: float = 0.0) -> float:
    """Spend ``plan`` (run -> rounds) with real epsilons; ``budget`` None: the final epsilon plus ``left``. Returns the final epsilon."""
    events = []
    accountant = SiteAccountant(AccountantKind.RDP)
    for run, rounds in plan.items():
        for _ in rounds:
            accountant.record(noise_multiplier=1.0, sample_rate=0.25, steps=4)
            events.append(accountant.epsilon(1e-5))
    budget = events[-1] + left if budget is None else budget
    with PrivacyLedger.create(path, site=site) as ledger:
        epsilons = iter(events)
        for run, rounds in plan.items():
            day = RUNS[run][0]
            for r in rounds:
                clock[0] = START + timedelta(days=day, hours=2 * r, minutes=len(site))
                ledger.append(run_id=run, round=r, noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5,
                              accountant="rdp", epsilon=next(epsilons), epsilon_budget=budget, data="d")
    return events[-1]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("sites")
    clock = [START]
    patch = pytest.MonkeyPatch()
    patch.setattr(ledger_module, "_now", lambda: clock[0].isoformat(timespec="microseconds"))
    try:
        _spends(root / "north" / "ledger.sqlite", NORTH, {"r-1102": [1, 2, 4, 5], "r-1109": [1, 2]}, clock, budget=20.0)
        for site, folder in ((EAST, "east"), (WEST, "west")):
            _spends(root / folder / "ledger.sqlite", site, {"r-1102": [1, 2, 3, 4, 5], "r-1109": [1, 2]}, clock, left=0.004)
    finally:
        patch.undo()
    db = sqlite3.connect(root / "north" / "ledger.sqlite")  # after the fact: entry 2 made to look like a smaller spend
    db.execute("UPDATE entries SET noise_multiplier = 3.0 WHERE seq = 2")
    db.commit()
    db.close()
    heads = []
    for folder, site in (("east", EAST), ("west", WEST)):
        with PrivacyLedger.read(root / folder / "ledger.sqlite") as ledger:
            seq, digest = ledger.head()
        heads.append({"site": site, "ledger_seq": seq, "ledger_hash": digest})
    (root / "privacy.json").write_text(json.dumps({"sites": heads}))
    yield root


@pytest.fixture(scope="module")
def page(state: Path) -> Path:
    out = state / "audit.html"
    result = CliRunner().invoke(app, ["audit", str(state), "--witness", str(state / "privacy.json"), "--html", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output  # north is tampered, east and west have spent their budgets' worth
    assert out.is_file() and "HTML report" in result.output
    return out


def test_the_audit_keeps_runs_gaps_times_and_the_larger_of_stated_and_recomputed(state: Path) -> None:
    north = audit_ledger(state / "north" / "ledger.sqlite")
    east = audit_ledger(state / "east" / "ledger.sqlite")

    assert not north.chain_ok and north.disagrees and north.epsilon_stated is not None and north.epsilon_recomputed is not None
    assert north.epsilon_recomputed < north.epsilon_stated and north.epsilon == pytest.approx(max(north.epsilon_stated, north.epsilon_recomputed))
    assert [(r["run_id"], r["rounds"], r["missing"]) for r in north.run_details] == [("r-1102", [1, 2, 4, 5], [3]), ("r-1109", [1, 2], [])]
    assert east.chain_ok and not east.disagrees and east.remaining == pytest.approx(0.004, abs=1e-9)
    first, second = east.run_details
    assert first["steps"] == 20 and first["noise_multipliers"] == [1.0] and first["sample_rates"] == [0.25]
    assert 0 < second["epsilon"] < first["epsilon"] < east.epsilon  # each run alone; the site's runs compose
    assert first["first"].startswith("2026-11-02T11:") and second["first"].startswith("2026-11-09T11:")


def test_the_page_is_offline_escaped_and_warns_first(page: Path, state: Path) -> None:
    text = page.read_text(encoding="utf-8")
    north = audit_ledger(state / "north" / "ledger.sqlite")

    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text and "west <b>" not in text
    assert text.count("<figure class='panel'>") == 3 and text.count("data:image/png;base64,") == 3
    warnings = text[text.index("class='warnings'"):text.index("</section>")]
    assert warnings.count("EXHAUSTED") == 2 and "east" in warnings and "west &lt;b&gt;" in warnings
    assert "north</b>: the ledger <span class='bad'>FAILED verification" in warnings and "states epsilon" in warnings
    assert "run r-1102: round(s) 3 not in the ledger" in warnings
    assert f"<b>{north.epsilon:.4f}</b>" in text and f"stated {north.epsilon_stated:.4f} / recomputed {north.epsilon_recomputed:.4f}" in text
    assert "every ledger head it records matched" in text and "add/remove-one neighbours" in text and "fedmm version" in text


def _png_colours(data_url: str) -> set[tuple[int, int, int]]:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as image:
        return {tuple(rgb) for _, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20) or []}  # type: ignore[arg-type,misc]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    chromium = Browser(_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def test_the_page_renders_in_chromium_with_a_panel_per_site(page: Path, state: Path, browser: Browser, tmp_path: Path) -> None:
    session, seen, problems = browser.load(page.as_uri())
    shot = tmp_path / "audit.png"
    browser.screenshot(session, seen["height"], shot)
    probe = ("({panels: Array.from(document.querySelectorAll('figure.panel img')).map(i => i.src),"
             " sites: Array.from(document.querySelector('table.sites').rows).length - 1,"
             " warnings: document.querySelector('.warnings').innerText, first: document.body.children[2].className})")
    dom: dict[str, Any] = browser.send("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session)["result"]["value"]

    assert problems == [] and seen["scripts"] == 0 and seen["external"] == []
    assert seen["images"] and all(image["ok"] for image in seen["images"]) and seen["width"] <= 1200
    assert dom["first"] == "warnings"  # the box comes before everything but the title and the verdict
    assert dom["sites"] == 3 and len(dom["panels"]) == 3 and len(set(dom["panels"])) == 3
    # east and west spent the same: each has its own panel, drawn in its own colour
    east, west = _png_colours(dom["panels"][0]), _png_colours(dom["panels"][2])  # the ledgers in path order: east, north, west
    assert (31, 119, 180) in east and (44, 160, 44) in west and (44, 160, 44) not in east and (31, 119, 180) not in west
    assert re.search(r"east is EXHAUSTED: 0\.0040 of its budget", dom["warnings"]) and "west <b> is EXHAUSTED" in dom["warnings"]
    assert "north: the ledger FAILED verification" in dom["warnings"]
    assert "west <b>" in seen["text"] and "r-1109" in seen["text"] and "missing: 3" in seen["text"]
    size, colours, inked = _colours(shot)
    assert size[0] == 1200 and size[1] >= 1200 and colours > 200 and 0.03 < inked < 0.9, (size, colours, inked)
    if os.environ.get("FEDMM_AUDIT_SCREENSHOT"):  # to look at it: FEDMM_AUDIT_SCREENSHOT=FILE
        shutil.copy(shot, os.environ["FEDMM_AUDIT_SCREENSHOT"])


def test_render_html_without_witness_or_spends_says_so(tmp_path: Path) -> None:
    PrivacyLedger.create(tmp_path / "ledger.sqlite", site="new-site").close()
    text = render_html([audit_ledger(tmp_path / "ledger.sqlite")])

    assert "none given" in text and "no spends" in text and "Warnings: none" in text and text.count("<figure class='panel'>") == 1
