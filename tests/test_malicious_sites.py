"""Issue 17, "the server trusts no site": a federation with a dishonest site.

Four honest fedmm sites (the real ClientApp, training on synthetic data) and one site that
sends, a round each, every bad update the reviewer found: other dtypes under the honest
layout string, a huge norm, weights of 0, -99, 10^12 and 1.5, and NaN. The server
(:class:`FedMMAvg` as a run's plan builds it, driven by Flower's own ``Strategy.start``
through :class:`LocalGrid`) must refuse each one, name it per reason and per site, and end
with the honest federation's model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.app import app as honest_app
from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.data.normalise import normalise
from fedmm.data.sources import load_source
from fedmm.federation.central import make_central_evaluation
from fedmm.federation.strategy import FedMMAvg
from fedmm.models import layout_fingerprint
from fedmm.plan import RunPlan
from fedmm.runtime.local import LocalGrid

HONEST = 4
MALICIOUS = {"malicious": True}  # the node config of the dishonest site

Arrays = dict[str, np.ndarray]
# (arrays, weight) from the global weights: what the dishonest site sends in round 1, 2, ...
ATTACKS: list[tuple[str, Callable[[Arrays], tuple[Arrays, Any]]]] = [
    ("dtype", lambda g: ({k: v.astype(np.float64) for k, v in g.items()}, 100)),
    ("dtype", lambda g: ({k: v.astype(np.int64) for k, v in g.items()}, 100)),
    ("dtype", lambda g: ({k: v.astype(np.float16) for k, v in g.items()}, 100)),
    ("dtype", lambda g: ({k: v.astype(bool) for k, v in g.items()}, 100)),
    ("dtype", lambda g: ({k: v.astype(np.complex64) for k, v in g.items()}, 100)),
    ("norm", lambda g: ({k: v + np.float32(1e30) for k, v in g.items()}, 100)),
    ("weight", lambda g: (g, 0)),
    ("weight", lambda g: ({k: -v for k, v in g.items()}, -99)),
    ("weight", lambda g: ({k: -v for k, v in g.items()}, 10**12)),
    ("weight", lambda g: (g, 1.5)),
    ("non-finite", lambda g: ({k: np.where(np.arange(v.size).reshape(v.shape) == 0, np.float32(np.nan), v) for k, v in g.items()}, 100)),
]


def _dishonest_app(attacks: list[tuple[str, Callable[[Arrays], tuple[Arrays, Any]]]]) -> ClientApp:
    """fedmm's ClientApp at honest nodes; the attack of the round at the dishonest one."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if not context.node_config.get("malicious"):
            return honest_app(msg, context)
        server_round = int(msg.content.config_records[protocol.CONFIG][protocol.SERVER_ROUND])  # type: ignore[call-overload]
        global_w = {k: v.numpy() for k, v in msg.content.array_records[protocol.ARRAYS].items()}
        arrays, weight = attacks[(server_round - 1) % len(attacks)][1](global_w)
        layout = layout_fingerprint({k: torch.from_numpy(v) for k, v in global_w.items()})  # the honest layout string, whatever it sends
        return Message(content=RecordDict({
            protocol.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: weight, protocol.TRAIN_LOSS: 0.1, protocol.EPSILON: 0.0}),
            protocol.MODEL: ConfigRecord({protocol.LAYOUT: layout}),
        }), reply_to=msg)

    return app


def _federation(tmp_path: Path, rounds: int, *, dishonest: bool, attacks: list[Any] = ATTACKS, **changes: Any) -> tuple[FedMMAvg, list[float], dict[str, np.ndarray]]:
    """Run ``rounds`` rounds the way server/app.py does; return the strategy, accuracy per round and the final model."""
    cfg = RunConfig(**{"data": "synthetic:400", "sites": HONEST, "rounds": rounds, "dp": False, "runs_dir": str(tmp_path), **changes})
    plan = RunPlan.from_config(cfg)
    recipe = plan.model
    source = load_source(cfg.data, plan.preprocessing, classes=cfg.class_list, lenient=cfg.lenient, test_fraction=cfg.test_fraction)
    test = normalise(source.require_test(), sensor_norm=cfg.sensor_norm, site_statistics=not cfg.dp)
    schema = recipe.prepare(test, tasks_from=recipe.task_classes(test)).schema
    initial = recipe.build(schema, seed=cfg.seed).state_dict()
    strategy = FedMMAvg.from_plan(plan, initial=initial, layout=layout_fingerprint(initial), learning_rate=plan.learning_rate(schema))
    accuracy: list[float] = []
    central = make_central_evaluation(cfg, test, lambda r, loss, acc, tasks: accuracy.append(acc), tasks_from=schema)
    nodes: list[dict[str, Any]] = [{"partition-id": i, "num-partitions": HONEST} for i in range(HONEST)] + ([MALICIOUS] if dishonest else [])
    grid = LocalGrid(_dishonest_app(attacks), nodes, cfg.to_run_config())
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds,
        train_config=ConfigRecord({protocol.SCHEMA: schema.to_json(), protocol.RUN_ID: "issue-17"}), evaluate_fn=central,
    )
    return strategy, accuracy[1:], {k: v.numpy() for k, v in result.arrays.items()}


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], dict[str, np.ndarray]]:
    _, accuracy, model = _federation(tmp_path_factory.mktemp("honest"), len(ATTACKS), dishonest=False)
    return accuracy, model


def test_every_bad_update_is_refused_named_and_the_model_stays_the_honest_one(
    tmp_path: Path, honest: tuple[list[float], dict[str, np.ndarray]],
) -> None:
    strategy, accuracy, model = _federation(tmp_path, len(ATTACKS), dishonest=True)

    assert strategy.rejected == Counter(reason for reason, _ in ATTACKS)
    assert strategy.rejected_by_site == {"node-105": dict(sorted(Counter(reason for reason, _ in ATTACKS).items()))}
    for server_round, (reason, _) in enumerate(ATTACKS, start=1):  # each refusal names its round, site and reason
        assert strategy.rejected_in(server_round) == {"node-105": [reason]}
    assert [r.node for r in strategy.rejections] == [105] * len(ATTACKS)
    assert "float64" in strategy.rejections[0].detail and "complex64" in strategy.rejections[4].detail
    assert strategy.sites_last_round == HONEST
    assert all(np.all(np.isfinite(v)) for v in model.values())
    honest_accuracy, honest_model = honest
    assert accuracy[-1] == pytest.approx(honest_accuracy[-1], abs=0.01) and honest_accuracy[-1] > 0.5
    for name, value in model.items():  # the dishonest site never entered the average
        assert value.dtype == honest_model[name].dtype
        np.testing.assert_allclose(value, honest_model[name], rtol=0, atol=1e-6)
    state = strategy.to_state()  # what a checkpoint (and a resumed run) keeps of the refusals
    assert [r["reason"] for r in state["rejections"]] == [reason for reason, _ in ATTACKS]


def _pull(g: Arrays) -> tuple[Arrays, Any]:
    """A well-formed update that passes every check and drags the model far away at the largest agreed weight."""
    return {k: (v + np.float32(50.0) * np.sign(np.cos(np.arange(v.size, dtype=np.float32))).reshape(v.shape)).astype(v.dtype) for k, v in g.items()}, 10**6


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_keep_a_valid_but_hostile_update_from_setting_the_model(
    tmp_path: Path, honest: tuple[list[float], dict[str, np.ndarray]], rule: str,
) -> None:
    strategy, accuracy, model = _federation(tmp_path, 3, dishonest=True, attacks=[("none", _pull)], aggregation=rule)

    assert strategy.rejected == {} and strategy.sites_last_round == HONEST + 1  # nothing to refuse: it is well-formed
    assert all(np.all(np.isfinite(v)) for v in model.values())
    assert accuracy[-1] >= honest[0][2] - 0.05


def test_fedavg_lets_the_same_update_set_the_model(tmp_path: Path, honest: tuple[list[float], dict[str, np.ndarray]]) -> None:
    _, accuracy, _ = _federation(tmp_path, 1, dishonest=True, attacks=[("none", _pull)])

    assert accuracy[-1] < honest[0][0] - 0.2  # why robust rules exist: a weight of 10^6 against about 400 records


def test_honest_private_sites_pass_the_auto_checks(tmp_path: Path) -> None:
    """Under dp=true the honest sites (weight 1, DP-SGD noise in every update) are all within the auto bound."""
    strategy, _, model = _federation(tmp_path, 2, dishonest=False, dp=True, max_site_weight=10_000)

    assert strategy.rejected == {} and strategy.sites_last_round == HONEST
    assert strategy.max_update_norm is not None and strategy.max_update_norm < 1e4
    assert all(np.all(np.isfinite(v)) for v in model.values())
