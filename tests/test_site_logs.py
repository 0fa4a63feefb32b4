"""A site's own log says what each round spent or why it refused; what reaches the server carries no local path."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedmm import protocol
from fedmm.errors import PrivacyError
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
    assert "site 0 round 1: trained, epsilon" in caplog.text and "left of its budget 20" in caplog.text
    assert refused.refused and "secret-hospital-path" not in refused.refused
    assert "site 0 refuses round 2" in caplog.text


def test_paths_are_replaced_by_what_they_are() -> None:
    ledger = Path("/srv/fedmm/site-a/ledger.sqlite")
    text = without_paths(f"ledger {ledger} does not verify; backups in {ledger.parent}/old and {Path.home()}/x", ledger)
    assert "/srv" not in text and str(Path.home()) not in text and "<the site's ledger>" in text and "<the site's state folder>/old" in text
