"""Shell snippets of the docs can be pasted twice (issue 19): read from the Markdown itself, then run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(markdown: Path, heading: str) -> list[str]:
    """The fenced bash blocks under ``heading`` (to the next heading of the same or a higher level, outside code)."""
    level = len(heading) - len(heading.lstrip("#"))
    blocks: list[str] = []
    inside, fence, body = False, None, []
    for line in markdown.read_text().splitlines():
        stripped = line.strip()
        if fence is None and not stripped.startswith("```") and re.match(r"#+ ", line):
            if inside and len(line) - len(line.lstrip("#")) <= level:
                break
            inside = inside or line == heading
        elif stripped.startswith("```"):
            if fence is None:
                fence, body = stripped[3:], []
            else:
                if inside and fence == "bash":
                    blocks.append("\n".join(body) + "\n")
                fence = None
        elif fence is not None:
            body.append(line)
    return blocks


def _connection_snippet() -> str:
    """The lines of docs/runs.md's flwr-run block that write the connection: from `flwr config list` to the heredoc's end."""
    (block,) = _bash_blocks(ROOT / "docs" / "runs.md", "## With `flwr run`")
    lines = block.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("flwr config list"))
    last = next(i for i in range(first, len(lines)) if lines[i] == "EOF")
    return "\n".join(lines[first:last + 1]) + "\n"


def test_the_flwr_connection_snippet_can_be_pasted_twice(tmp_path: Path) -> None:
    snippet = _connection_snippet()
    assert ">>" in snippet  # the snippet under test appends to the config file
    env = {**os.environ, "HOME": str(tmp_path), "FLWR_HOME": str(tmp_path / ".flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for _ in range(2):
        subprocess.run(["bash", "-euo", "pipefail", "-c", snippet], env=env, check=True, timeout=120)
        text = (tmp_path / ".flwr" / "config.toml").read_text()
        config = tomllib.loads(text)  # a second [superlink.fedmm-local] table would not parse
        assert config["superlink"]["fedmm-local"]["address"] == "127.0.0.1:39093"
        assert len(re.findall(r"^\[superlink\.fedmm-local\]", text, re.M)) == 1
    listed = subprocess.run(["flwr", "config", "list"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert listed.returncode == 0 and "fedmm-local" in listed.stdout


def test_deploy_snippets_guard_what_a_second_paste_would_redo() -> None:
    """Certificates, keys, the ledger and firewall rules are made once: each is guarded by a check."""
    found = _bash_blocks(ROOT / "docs" / "deploy.md", "# Deploying fedmm at data sites")
    assert len(found) > 5
    blocks = "\n".join(found)
    previous = ""
    for line in blocks.splitlines():
        command = line.split("#")[0]
        if re.search(r"fedmm (certs (init|site)|ledger init)\b", command):
            assert "[ -f " in command, line
        if "iptables -A" in command:
            assert "iptables -C" in command, line
        assert "mkdir " not in command or "mkdir -p" in command, line
        # an append is guarded by a grep on its own line or on the line it continues ("grep -q ... ||")
        assert ">> " not in command or "grep -q" in command or re.search(r"grep -q .*\|\|\s*$", previous), line
        previous = command.rstrip()
