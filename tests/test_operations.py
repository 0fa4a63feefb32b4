"""Operating a federation as docs/deploy.md says (issue 19), with real processes on loopback.

The guide's own shell blocks (certificates, the flwr connection, registration, the site file and
its copies, the ledger; the cheap ones pasted twice) set up a server and three sites, then
studies run one after another:
a site SIGKILLed mid-round is named lost within 10 s (``fedmm status`` and the server log),
leaves no process behind, and rejoins after a restart; a second study within the sites'
lifetime budget completes; a study beyond it ends ``stopped`` with the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from fedmm.privacy.audit import audit_ledger
from fedmm.runtime.loopback import (
    CLI_POLL,
    PROJECT,
    LoopbackDeployment,
    descendants,
    free_port,
)

SITES = ("george", "jackson", "theo")
MANIFEST = PROJECT / "fedmm" / "data" / "builtin" / "manifest-example" / "manifest.csv"


def _guide_block(fence: str, first_line: str) -> str:
    """The fenced ``fence`` block of docs/deploy.md whose first line is ``first_line``."""
    text = (PROJECT / "docs" / "deploy.md").read_text()
    for block in re.findall(rf"```{fence}\n(.*?)```", text, re.DOTALL):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"docs/deploy.md has no {fence} block starting {first_line!r}")


def _bash(deploy: LoopbackDeployment, snippet: str, *, times: int = 2) -> None:
    """Run a shell block of the guide as an operator pastes it (by default twice: a second paste must do no harm)."""
    for _ in range(times):
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", snippet], cwd=deploy.root, env=deploy.env, capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, f"{snippet}\n--- exit {done.returncode}\n{done.stdout}\n{done.stderr}"


def _set_up_as_the_guide_says(deploy: LoopbackDeployment) -> None:
    """Steps 1 to 4 of docs/deploy.md, from its own blocks: only the server's port, the data path and free local ports change."""
    port = str(deploy.port)
    _bash(deploy, _guide_block("bash", "# a private CA and the server's certificate"), times=1)  # 1. (its guards: test_doc_snippets.py)
    _bash(deploy, _guide_block("bash", "flwr config list").replace("127.0.0.1:9092", f"127.0.0.1:{port}"))  # 3. the connection
    deploy.start("server", *deploy.server_args)  # 2. (its own block's port and state folder, this test's)
    deploy.wait_for("the SuperLink", lambda: '"success": true' in deploy.flwr("supernode", "ls", "fedmm", "--format", "json").stdout, interval=CLI_POLL)
    _bash(deploy, _guide_block("bash", "for s in george jackson theo; do   # a key already registered"), times=1)  # 3. register by name
    template = _guide_block("toml", "[site]\n")  # 4. the site file and its copies for the other sites
    local = free_port()
    (deploy.root / "george.toml").write_text(
        template.replace('"127.0.0.1:9092"', f'"127.0.0.1:{port}"').replace("manifest:fedmm/", f"manifest:{PROJECT}/fedmm/").replace("= 9094", f"= {local}")
    )
    copies = _guide_block("bash", "sed -e 's/george/jackson/g'").replace("/= 9094/", f"/= {local}/")
    _bash(deploy, re.sub(r"= 909[56]/", lambda _: f"= {free_port()}/", copies))
    ports = {re.search(r"clientapp-port = (\d+)", (deploy.root / f"{site}.toml").read_text()).group(1) for site in SITES}  # type: ignore[union-attr]
    assert len(ports) == 3, ports  # each site its own local port, as the guide says
    ledger = _guide_block("bash", "# once: logged in ledger.sqlite.log").splitlines()
    init = next(line for line in ledger if "ledger init" in line)
    for site in SITES:
        _bash(deploy, init.replace("george", site))
        deploy.start(site, "site", f"{site}.toml")
    deploy.wait_for("3 sites online", lambda: deploy.online() == 3, interval=CLI_POLL)


def _status(deploy: LoopbackDeployment, run: Path) -> tuple[int, dict[str, object]]:
    done = deploy.fedmm("status", str(run), "--json")
    return done.returncode, json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}


def _presence(run: Path) -> dict[str, dict[str, object]]:
    try:
        return dict(json.loads((run / "presence.json").read_text())["sites"])
    except (OSError, ValueError, KeyError):
        return {}


def _rounds(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_a_federation_run_as_the_guide_says_names_a_lost_site_and_reports_each_study(tmp_path: Path) -> None:
    deploy = LoopbackDeployment(tmp_path)
    runs = tmp_path / "runs"
    study = (
        f"data='manifest:{MANIFEST}' sites=3 batch-size=16 min-sites=2 "
        f"runs-dir='{runs}'"
    )
    try:
        _set_up_as_the_guide_says(deploy)
        first = runs / "study-1"
        # FedAvg: a site lost mid-round under SecAgg+ is tests/test_deploy.py's loopback test
        first_id = deploy.submit(f"{study} rounds=6 target-epsilon=8.0 run-name='study-1'")
        deploy.wait_for("round 1 of study 1", lambda: 1 in _rounds(first), timeout=240)

        # SIGKILL theo's `fedmm site` supervisor alone, in the middle of a round: its children must go with it.
        theo = deploy.processes.pop("theo")
        children = descendants(theo.pid)
        assert children, "fedmm site started no process"
        deploy.wait_for("a round under way", lambda: (first / "presence.json").exists() and len(_rounds(first)) >= 1)
        killed_at = time.monotonic()
        os.kill(theo.pid, signal.SIGKILL)
        theo.wait(10)
        deploy.wait_for("theo named lost", lambda: _presence(first).get("theo", {}).get("state") == "lost", timeout=30)
        named_after = time.monotonic() - killed_at
        assert named_after < 10, f"theo was named lost {named_after:.1f} s after it died"
        code, status = _status(deploy, first)
        assert code == 0 and status["state"] == "running"
        theo_row = next(s for s in status["sites"] if s["name"] == "theo")  # type: ignore[union-attr]
        assert theo_row["presence"] == "lost" and "heartbeat" in str(theo_row["presence_reason"])
        deploy.wait_for("no process of theo's left", lambda: not _alive(children), timeout=10)

        # theo comes back: the same key, the same ledger; it is online again and trains in a later round.
        theo_ledger = tmp_path / "state" / "theo" / "ledger.sqlite"
        spent_before = len(audit_ledger(theo_ledger).entries)
        deploy.start("theo", "site", "theo.toml")
        deploy.wait_for("theo back online", lambda: _presence(first).get("theo", {}).get("state") == "online", timeout=60)
        deploy.wait_for("study 1 to end", lambda: (first / "summary.json").exists(), timeout=300)
        assert len(audit_ledger(theo_ledger).entries) > spent_before, "theo did not train again after it rejoined"
        code, status = _status(deploy, first)
        assert code == 0 and status["state"] == "completed", status
        log = deploy.server_log(first_id)
        assert re.search(r"site theo \(node \d+\) LOST", log), log[-4000:]

        # A second study fits in every site's remaining lifetime budget (24); a third asks for more than is left.
        second = runs / "study-2"
        deploy.submit(f"{study} rounds=2 target-epsilon=8.0 run-name='study-2'")
        deploy.wait_for("study 2 to end", lambda: (second / "summary.json").exists(), timeout=300)
        code, status = _status(deploy, second)
        assert code == 0 and status["state"] == "completed", status
        third = runs / "study-3"
        deploy.submit(f"{study} rounds=4 target-epsilon=24.0 run-name='study-3'")
        deploy.wait_for("study 3 to end", lambda: (third / "summary.json").exists(), timeout=300)
        code, status = _status(deploy, third)
        assert code == 3 and status["state"] == "stopped" and "budget" in str(status["reason"]), status
        shown = deploy.fedmm("status", str(third))
        assert "STOPPED" in shown.stdout and "budget" in shown.stdout, shown.stdout
    finally:
        deploy.stop_all()
    for site in SITES:
        assert audit_ledger(tmp_path / "state" / site / "ledger.sqlite").ok
    assert not [p for p in deploy.processes.values() if p.poll() is None]
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False).stdout.split()
    assert not leftover, f"processes of this federation still running: {leftover}"
