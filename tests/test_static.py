"""The package type-checks (house style: mypy on fedmm, server and clients)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_mypy_finds_no_errors() -> None:
    root = Path(__file__).resolve().parents[1]

    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True, text=True, timeout=600, check=False)

    assert done.returncode == 0, done.stdout + done.stderr
