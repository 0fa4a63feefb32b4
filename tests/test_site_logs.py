"""A site's own log says what each round spent or why it refused; what reaches the server carries no local path."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from fedmm import protocol
from fedmm.errors import ConfigError, PrivacyError
from fedmm.models import ModelRecipe
from fedmm.plan import RunPlan
from fedmm.site.data import site_data
from fedmm.site.io import RoundRequest
from fedmm.site.runner import run_round, without_paths

RUN = {"data": "synthetic:60", "rounds": 2, "sites": 1, "batch-size": 16, "target-epsilon": 8.0}


def _request(state_dir: Path, server_round: int, run_config: dict[str, object]) -> RoundRequest:
    node = {protocol.NODE_SITE: "0", protocol.NODE_STATE_DIR: str(state_dir), protocol.NODE_EPSILON_BUDGET: 20.0}
    plan = RunPlan.from_run_config(run_config)
    _, data = site_data(node, plan.config)
    recipe = plan.model
    schema = recipe.prepare(data).schema
    weights = {k: v.numpy() for k, v in recipe.build(schema).state_dict().items()}
    config = {protocol.SERVER_ROUND: server_round, protocol.SCHEMA: schema.to_json(), protocol.RUN_ID: "study-1"}
    return RoundRequest(run_config=dict(run_config), node_config=node, config=config, global_weights=weights, node_id=7)


def test_a_missing_ledger_is_named_in_the_site_log_and_not_to_the_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "secret-hospital-path" / "site-0"
    with caplog.at_level(logging.ERROR, logger="fedmm.site"), pytest.raises(PrivacyError) as err:
        run_round(_request(state, 1, RUN))
    assert "secret-hospital-path" not in str(err.value) and "<the site's" in str(err.value)
    assert "secret-hospital-path" in caplog.text  # the operator still sees where


def test_every_round_logs_its_spend_and_a_refusal_its_reason_without_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from typer.testing import CliRunner

    from fedmm.cli import app

    state = tmp_path / "secret-hospital-path" / "site-0"
    assert CliRunner().invoke(app, ["ledger", "init", str(state), "--site", "0"]).exit_code == 0
    with caplog.at_level(logging.INFO, logger="fedmm.site"):
        trained = run_round(_request(state, 1, RUN))
        refused = run_round(_request(state, 2, {**RUN, "dp": False}))  # the site's policy requires DP
    assert trained.refused is None and np.isfinite(trained.metrics[protocol.EPSILON])
    assert re.search(r"site 0 round 1: trained in \d+\.\d s, epsilon", caplog.text) and "left of its budget 20" in caplog.text
    assert refused.refused and "secret-hospital-path" not in refused.refused
    assert "site 0 refuses round 2" in caplog.text


def test_paths_are_replaced_by_what_they_are() -> None:
    ledger = Path("/srv/fedmm/site-a/ledger.sqlite")
    text = without_paths(f"ledger {ledger} does not verify; backups in {ledger.parent}/old and {Path.home()}/x", ledger)
    assert "/srv" not in text and str(Path.home()) not in text and "<the site's ledger>" in text and "<the site's state folder>/old" in text


def test_a_log_line_is_printed_once_even_after_opacus_configures_logging() -> None:
    """Opacus' import adds a root handler; Flower's lines must not reach it too (``flwr log`` showed each twice)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import server.app, clients.app, opacus.utils.module_utils\n"
        "from logging import INFO\nfrom flwr.common.logger import log\nlog(INFO, '[fedmm] one line, once')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120, check=True)
    assert (done.stdout + done.stderr).count("one line, once") == 1, done.stdout + done.stderr


def test_a_site_trains_only_on_the_manifest_rows_that_carry_its_name() -> None:
    """One manifest with a site column serves a loopback trial of several sites (docs/deploy.md)."""
    from fedmm.config import RunConfig
    from fedmm.site.data import site_data

    spec = "manifest:fedmm/data/builtin/manifest-example/manifest.csv"
    seen = {}
    for site in ("george", "jackson", "theo"):
        name, data = site_data({"site": site, "data": spec}, RunConfig(data=spec))
        seen[name] = len(data)
    assert seen == {"george": 40, "jackson": 40, "theo": 40}  # each its own 40 training rows, not all 120
    # No row of its name: refused (it trained on all 120 rows of george's, jackson's and theo's before)
    with pytest.raises(ConfigError, match="none this site"):
        site_data({"site": "lucas", "data": spec}, RunConfig(data=spec))


def test_a_simulated_site_keeps_its_paths_in_what_the_server_is_told() -> None:
    """A simulated site's folders are the simulating user's own: the path is the fix they need (tests/test_simulation.py)."""
    from fedmm.site.runner import _for_server

    message, ledger = "no privacy ledger at /home/u/state/a/ledger.sqlite", "/home/u/state/a/ledger.sqlite"
    assert _for_server(message, ledger, {protocol.NODE_PARTITION_ID: 0}) == message
    assert "/home/u" not in _for_server(message, ledger, {protocol.NODE_SITE: "a"})
