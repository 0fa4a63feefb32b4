"""What the ledger tests share: one small tabular site's settings and the CLI as an operator runs it."""

from __future__ import annotations

from typer.testing import CliRunner

from fedmm.cli import app
from fedmm.config import RunConfig

# A tabular synthetic site that trains in milliseconds; a target of 1000 leaves room for many spends.
TABULAR = RunConfig(data="synthetic", modalities="tabular", batch_size=16, noise_multiplier=1.0, target_epsilon=1000.0, rounds=100)


def run_cli(*args: str) -> tuple[int, str]:
    """``fedmm ARGS``: exit code and output on one line (wide, so no message wraps)."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "240"})
    return result.exit_code, " ".join(result.output.split())
