"""``fedmm report``: the HTML page of a run, rendered and checked in a real headless Chromium.

The runs are written by hand in the shapes ``server/app.py`` writes (one with the
evaluation fields of this release, one from before them, one that failed), so the test needs
no simulation. The browser is Debian's Chromium, driven over the Chrome DevTools protocol on
a pipe (``--remote-debugging-pipe``: file descriptors 3 and 4, null-terminated JSON; no
websocket, no new dependency). Over it the test collects every console message, uncaught
exception, log entry and JavaScript dialog, asks the page how many scripts it has and
whether each image decoded, and takes a full-page screenshot. A control page with a script
that errors and a broken image is loaded first, in the same browser, to prove the harness
does see such problems. Without Chromium the test skips, saying how to install it, except
under CI=true, where it fails.
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedmm.cli import app
from fedmm.errors import DataError
from fedmm.federation.report import NOT_RECORDED, load_run, render_report, write_report

EVIL = "<script>alert(1)</script>"
CLASSES = ["cat", "dog", EVIL, "price in $US"]
SITES = ["clinic-a", "clinic-b", "clinic-c", "lab <b>4</b>"]
INSTALL = "install Debian's Chromium: `sudo apt-get install -y chromium` (FEDMM_EXTRAS=test bash scripts/setup.sh does it as root)"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--remote-debugging-pipe"]


def _write(run: Path, rounds: list[dict[str, Any]], summary: dict[str, Any] | None, privacy: list[dict[str, Any]], *, dp: bool = True) -> Path:
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f'rounds = 6\ndata = "synthetic:120"\nmodel = "concat"\ndp = {str(dp).lower()}\n'
                                     'target-epsilon = 8.0\ntarget-delta = 1e-05\naccountant = "rdp"\nsecure-aggregation = false\n')
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (run / "privacy.json").write_text(json.dumps({"sites": privacy, "client_level": None}))
    (run / "federation.json").write_text(json.dumps({"sites": {s: {"samples": 20, "per_class": dict.fromkeys(CLASSES, 5)} for s in SITES}}))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps({"run_id": run.name, "rounds_planned": 6, "stopped": None, "sites": 4, "dp": dp,
                                                      "delta": 1e-5, "accountant": "rdp", **summary}))
    return run


def _privacy(rounds: int, refused: str | None = None) -> list[dict[str, Any]]:
    return [{"site": s, "epsilon": 1.33 * rounds, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.1, "sample_rate": 0.25,
             "steps": 4 * rounds, "epsilon_budget": 10.0, "ledger_seq": rounds, "refused": refused if s == SITES[2] else None,
             "epsilon_site": 1.33 * rounds, "epsilon_server": 1.32 * rounds} for s in SITES]


def _round(n: int, *, new: bool) -> dict[str, Any]:
    acc = 0.3 + 0.1 * n - (0.18 if n == 6 else 0)
    record = {"round": n, "accuracy": acc, "loss": 2.2 - 0.2 * n, "seconds": 0.5, "train_loss": None, "sites": 4, "max_epsilon": 1.33 * n,
              "delta": 1e-5, "rejected": int(n == 3), "rejected_by": {SITES[1]: ["update norm over the bound"]} if n == 3 else {}}
    if new:
        confusion = [[6 + n, 2, 1, 1], [1, 5 + n, 2, 0], [2, 1, 4 + n, 1], [0, 3, 1, 3 + n]]
        record["macro_f1"] = acc - 0.05
        record["confusion"] = confusion
        record["per_class"] = {c: {"precision": 0.5 + 0.05 * i, "recall": 0.6, "f1": 0.55, "support": sum(confusion[i])} for i, c in enumerate(CLASSES)}
        taking = [s for s in SITES if not (s == SITES[2] and n >= 5) and not (s == SITES[3] and n == 2) and not (s == SITES[1] and n == 3)]
        record["participants"] = taking
    return record


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    new = [_round(n, new=True) for n in range(1, 7)]
    last = new[-1]
    summary = {"rounds": 6, "final_accuracy": last["accuracy"], "final_loss": last["loss"], "max_epsilon": 7.98, "final_macro_f1": last["macro_f1"],
               "classes": CLASSES, "per_class": last["per_class"], "confusion": last["confusion"], "best_round": 5,
               "best_accuracy": new[4]["accuracy"], "best_macro_f1": new[4]["macro_f1"]}
    old = [_round(n, new=False) for n in range(1, 4)]
    return {
        "new": _write(root / "20261130-new", new, summary, _privacy(6, refused="budget: the next round would take epsilon past the site's own budget")),
        "old": _write(root / "20261130-old", old, {"rounds": 3, "final_accuracy": old[-1]["accuracy"], "final_loss": old[-1]["loss"], "max_epsilon": 4.2}, _privacy(3)),
        "failed": _write(root / "20261130-failed", old[:2], None, _privacy(2)),
    }


# --- the page, without a browser -------------------------------------------------------------

def test_new_fields_are_shown_and_every_artifact_string_is_escaped(runs: dict[str, Path]) -> None:
    page = render_report(runs["new"])

    assert EVIL not in page and "<b>4</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "lab &lt;b&gt;4&lt;/b&gt;" in page
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") == 3  # per-round curves, participation, confusion matrix
    assert "Completed." in page and "best round" in page.lower() and "the next round would take epsilon past" in page
    assert NOT_RECORDED not in page


def test_an_old_run_renders_and_says_what_it_did_not_record(runs: dict[str, Path]) -> None:
    page = render_report(runs["old"])

    assert f"Confusion matrix: {NOT_RECORDED}" in page and f"Per-class precision, recall and F1: {NOT_RECORDED}" in page
    assert "participants) is " + NOT_RECORDED in page and "final macro-F1" in page


def test_a_failed_run_says_so_and_a_folder_that_is_no_run_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    page = render_report(runs["failed"])
    assert "This run failed: it left no summary.json" in page and "2 round(s) of metrics" in page

    with pytest.raises(DataError, match="neither metrics.jsonl nor summary.json") as err:
        load_run(tmp_path)
    assert str(tmp_path) in str(err.value) and "runs/<run-id>/" in str(err.value)


def test_the_command_writes_run_report_html_and_exits_1_on_a_folder_that_is_no_run(runs: dict[str, Path], tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["report", str(runs["old"])])
    wrong = CliRunner().invoke(app, ["report", str(tmp_path)])

    assert done.exit_code == 0, done.output
    assert (runs["old"] / "report.html").is_file() and str(runs["old"] / "report.html") in done.output
    assert wrong.exit_code == 1 and "not a fedmm run folder" in " ".join(wrong.output.split())  # rich wraps lines


# --- the page in a real browser -----------------------------------------------------------------

def _chromium() -> str:
    found = os.environ.get("FEDMM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = f"Chromium not found: the report's browser test needs it; {INSTALL}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe (our fd -> its fd 3, its fd 4 -> our fd)."""

    def __init__(self, executable: str, profile: Path, timeout: float = 30.0) -> None:
        self.timeout, self.next_id, self.buffer, self.events = timeout, 0, b"", []
        to_child, self.writer = os.pipe()
        self.reader, from_child = os.pipe()
        # Above 9, so that moving them to 3 and 4 cannot overwrite one with the other (bash: dash takes one-digit fds only).
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
        for fd in (to_child, from_child):
            os.close(fd)
        command = ["bash", "-c", f'exec "$@" 3<&{high[0]} 4>&{high[1]} {high[0]}<&- {high[1]}>&-', "bash", executable, *FLAGS, f"--user-data-dir={profile}"]
        self.log = profile / "chromium.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, pass_fds=high, stdout=log, stderr=log)
        for fd in high:
            os.close(fd)

    def _receive(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.reader], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.reader, 1 << 20) if ready else b""
            if not ready or not chunk:
                raise AssertionError(f"Chromium {'timed out' if not ready else 'closed the pipe'} (exit code {self.process.poll()}); "
                                     f"its log: {self.log.read_text(errors='replace')[-2000:]}")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        event = json.loads(message)
        if event.get("method") == "Page.javascriptDialogOpening":  # a dialog would block the page: note it, close it
            self.send("Page.handleJavaScriptDialog", {"accept": True}, event.get("sessionId"), wait=False)
        return event

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None, *, wait: bool = True) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        asked = self.next_id
        while wait:
            reply = self._receive()
            if reply.get("id") == asked:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return dict(reply.get("result", {}))
            self.events.append(reply)
        return {}

    def load(self, url: str) -> tuple[str, dict[str, Any], list[str]]:
        """Open ``url`` in a new tab; return its session, what the page says of itself, and its problems."""
        self.events.clear()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 3000, "deviceScaleFactor": 1, "mobile": False}, session)
        self.send("Page.navigate", {"url": url}, session)
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session for e in self.events):
            self.events.append(self._receive())
        probe = ("({scripts: document.scripts.length, width: document.documentElement.scrollWidth,"
                 " height: document.documentElement.scrollHeight, text: document.body.innerText,"
                 " images: Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0})),"
                 " external: Array.from(document.querySelectorAll('[src],[href]')).map(n => n.getAttribute('src') || n.getAttribute('href'))"
                 ".filter(u => !u.startsWith('data:') && !u.startsWith('#'))})")
        page = self.send("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session)["result"]["value"]
        problems = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                problems.append(f"uncaught: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                problems.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
            elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
                problems.append(f"log {params['entry']['level']}: {params['entry'].get('text')}")
            elif method == "Page.javascriptDialogOpening":
                problems.append(f"dialog: {params.get('message')}")
        return session, page, problems

    def screenshot(self, session: str, height: int, path: Path) -> None:
        self.send("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": max(height, 800), "deviceScaleFactor": 1, "mobile": False}, session)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, session)["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", wait=False)
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self.writer)
            os.close(self.reader)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    chromium = Browser(_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def _colours(path: Path) -> tuple[tuple[int, int], int, float]:
    """Size, distinct colours, and the share of pixels that are not near-white."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        grey = rgb.convert("L")
        inked = sum(count for level, count in enumerate(grey.histogram()) if level < 235)
        return rgb.size, len(colours), inked / (rgb.size[0] * rgb.size[1])


def test_the_harness_sees_a_script_error_a_console_error_and_a_broken_image(browser: Browser, tmp_path: Path) -> None:
    control = tmp_path / "control.html"
    control.write_text("<!doctype html><html><body><p>control</p><img alt='broken' src='data:image/png;base64,AAAA'>"
                       "<script>console.error('control error'); noSuchFunction();</script></body></html>")

    _, page, problems = browser.load(control.as_uri())

    assert page["scripts"] == 1 and page["images"] == [{"alt": "broken", "ok": False}]
    assert any("control error" in p for p in problems) and any(p.startswith("uncaught") for p in problems), problems


@pytest.mark.parametrize("which", ["new", "old", "failed"])
def test_the_report_renders_in_chromium_offline_without_errors(which: str, runs: dict[str, Path], browser: Browser, tmp_path: Path) -> None:
    report = write_report(runs[which], tmp_path / "report.html")

    session, page, problems = browser.load(report.as_uri())
    shot = tmp_path / f"report-{which}.png"
    browser.screenshot(session, page["height"], shot)

    assert problems == []
    assert page["scripts"] == 0 and page["external"] == []  # no script ran or could; nothing to fetch
    assert page["images"] and all(image["ok"] for image in page["images"]), page["images"]
    assert page["width"] <= 1200, f"the page is {page['width']} px wide: something overflows a 1200 px window"
    assert "fedmm run 20261130-" + which in page["text"]
    if which == "new":
        assert EVIL in page["text"] and "lab <b>4</b>" in page["text"]  # shown as text, never as markup
    size, colours, inked = _colours(shot)
    assert size[0] == 1200 and size[1] >= 1200 and colours > 200 and 0.03 < inked < 0.9 and not math.isnan(inked), (size, colours, inked)
    if os.environ.get("FEDMM_REPORT_SCREENSHOTS"):  # to look at them: FEDMM_REPORT_SCREENSHOTS=DIR
        shutil.copy(shot, Path(os.environ["FEDMM_REPORT_SCREENSHOTS"]) / shot.name)
