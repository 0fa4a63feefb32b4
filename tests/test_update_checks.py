"""Issue 17: the checks every update passes before anything is summed, and the robust rules."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.errors import ConfigError, FederationError
from fedmm.federation.book import FederationBook
from fedmm.federation.checks import check_update, check_weight
from fedmm.federation.robust import Aggregation, aggregate, least_updates, update_norm_bound
from fedmm.federation.strategy import FedMMAvg

GLOBAL = {"w": np.array([0.5, -0.5, 1.0], np.float32)}


def _reply(node: int, arrays: dict[str, np.ndarray], weight: object = 1, *, site: str | None = None, **metrics: object) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"q{node}",
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: weight, protocol.EPSILON: 0.0, **metrics}),  # type: ignore[dict-item]
    })
    if site is not None:
        content[protocol.PRIVACY] = ConfigRecord({
            protocol.SITE: site, protocol.EPSILON: 1.0, protocol.DELTA: 1e-5, protocol.ACCOUNTANT: "rdp",
            protocol.NOISE_MULTIPLIER: 1.0, protocol.SAMPLE_RATE: 0.1, protocol.STEPS: 10,
        })
    return Message(content=content, metadata=metadata)


def _strategy(**kwargs: object) -> FedMMAvg:
    strategy = FedMMAvg(sites=3, reference={"w": (3,)}, **{"dp": False, **kwargs})  # type: ignore[arg-type]
    strategy._global = {k: v.copy() for k, v in GLOBAL.items()}  # as configure_train sets it
    return strategy


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (np.array([0.5, -0.5, 1.0], np.float64), "dtype"), (np.array([1, 0, 1], np.int64), "dtype"),
        (np.array([0.5, -0.5, 1.0], np.float16), "dtype"), (np.array([True, False, True]), "dtype"),
        (np.array([0.5, -0.5, 1.0], np.complex64), "dtype"), (np.array([0.5, 1e30, 1.0], np.float32), "norm"),
        (np.array([np.nan, 0.0, 1.0], np.float32), "non-finite"), (np.ones(4, np.float32), "shape"),
    ],
)
def test_check_update_refuses_each_bad_tensor(value: np.ndarray, kind: str) -> None:
    problem = check_update({"w": value}, GLOBAL, max_norm=10.0, base=GLOBAL)

    assert problem is not None and problem[0] == kind


def test_the_norm_is_that_of_the_change_to_the_global_model() -> None:
    near = {"w": GLOBAL["w"] + np.float32(0.1)}

    assert check_update(near, GLOBAL, max_norm=0.2, base=GLOBAL) is None  # ||0.1 x 3|| = 0.17
    assert check_update(near, GLOBAL, max_norm=0.2) == ("norm", "L2 norm 1.31529 is above the agreed max-update-norm 0.2")


@pytest.mark.parametrize(("value", "dp", "ok"), [(1, True, True), (2, True, False), (0, False, False), (-99, False, False),
                                                  (10**12, False, False), (1.5, False, False), (True, False, False), (10**6, False, True)])
def test_weights_are_integers_in_the_agreed_range(value: object, dp: bool, ok: bool) -> None:
    assert (check_weight(value, dp=dp, max_weight=10**6) is None) is ok


def test_each_refusal_is_counted_per_reason_and_per_site() -> None:
    strategy = _strategy(dp=True)
    good = [_reply(n, GLOBAL, site=s) for n, s in ((1, "a"), (2, "b"))]
    bad = [
        _reply(3, GLOBAL, 2, site="c"),  # dp=true: exactly 1
        _reply(4, {"w": GLOBAL["w"].astype(np.float64)}, site="d"),
        _reply(5, GLOBAL, site="e", **{protocol.TRAIN_LOSS: float("nan")}),  # dp=true sends no loss, and none NaN
    ]
    extra = _reply(6, GLOBAL)
    extra.content["more"] = ArrayRecord({"w": torch.zeros(3)})  # a second array record
    extra.content[protocol.PRIVACY] = good[0].content[protocol.PRIVACY]

    arrays, _ = strategy.aggregate_train(1, good + bad + [extra])

    np.testing.assert_array_equal(arrays["w"].numpy(), GLOBAL["w"])
    assert arrays["w"].numpy().dtype == np.float32
    assert strategy.rejected == {"weight": 1, "dtype": 1, "metrics": 1, "tensors": 1}
    assert strategy.rejected_by_site == {"a": {"tensors": 1}, "c": {"weight": 1}, "d": {"dtype": 1}, "e": {"metrics": 1}}
    assert strategy.rejected_in(1) == {"c": ["weight"], "d": ["dtype"], "e": ["metrics"], "a": ["tensors"]}
    restored = FederationBook(dp=True)
    restored.restore(strategy.to_state(), rounds_done=1)
    assert restored.rejected_by_site == strategy.rejected_by_site


def test_a_non_finite_global_model_stops_the_run_before_it_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedmm.federation.strategy as module

    monkeypatch.setattr(module, "aggregate", lambda *a, **k: ({"w": np.array([np.inf, 0.0, 0.0])}, [0]))
    strategy = _strategy()

    with pytest.raises(FederationError, match="round 1: the aggregated global model holds NaN or infinite values.*not applied"):
        strategy.aggregate_train(1, [_reply(1, GLOBAL)])
    assert strategy.latest_arrays is None


def _flower_messages(updates: list[np.ndarray]) -> list[Message]:
    return [_reply(i + 1, {"w": u}) for i, u in enumerate(updates)]


@pytest.mark.parametrize("rule", ["trimmed-mean", "median", "krum"])
def test_the_robust_rules_are_flowers(rule: str) -> None:
    from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

    rng = np.random.default_rng(3)
    updates = [rng.normal(0, 1, 50).astype(np.float32) for _ in range(5)] + [np.full(50, 40.0, np.float32)]
    flower = {"trimmed-mean": FedTrimmedAvg(beta=1 / 6 + 1e-9), "median": FedMedian(), "krum": Krum(num_malicious_nodes=1)}[rule]

    expected, _ = flower.aggregate_train(1, _flower_messages(updates))
    ours, used = aggregate(Aggregation(rule), [{"w": u} for u in updates], [1] * 6, malicious=1)

    assert expected is not None
    np.testing.assert_allclose(ours["w"], expected["w"].numpy(), rtol=1e-6, atol=1e-6)
    assert 5 not in used or rule != "krum"  # Krum never chooses the outlier


def test_a_robust_rule_stops_when_too_few_updates_are_left() -> None:
    strategy = _strategy(aggregation="krum", malicious_sites=1)

    with pytest.raises(FederationError, match="fewer than the 5 the aggregation rule needs"):
        strategy.aggregate_train(1, [_reply(n, GLOBAL) for n in range(1, 5)])
    assert least_updates(Aggregation.MEDIAN, 2) == 5


def test_the_config_names_every_rule_and_refuses_the_combinations_that_cannot_work() -> None:
    for rule in Aggregation:
        assert RunConfig(aggregation=rule.value, sites=6).aggregation == rule.value
    with pytest.raises(ConfigError, match="'aggregation': must be one of"):
        RunConfig(aggregation="mean")
    with pytest.raises(ConfigError, match="client-level DP's noise is calibrated"):
        RunConfig(aggregation="trimmed-mean", client_dp=True)
    with pytest.raises(ConfigError, match="krum tolerates 1 bad site.*at least 5"):
        RunConfig(aggregation="krum", sites=4)
    with pytest.raises(ConfigError, match="'max-update-norm': must be > 0"):
        RunConfig(max_update_norm=0.0)
    with pytest.raises(ConfigError, match="'max-site-weight': must be >= 1"):
        RunConfig(max_site_weight=0)
    assert RunConfig.from_run_config({"max-update-norm": "auto"}).max_update_norm is None


def test_the_auto_bound_follows_the_documented_formula() -> None:
    from fedmm.federation.robust import NOISE_TAIL

    # No DP: lr / (1 - mu) x E x ceil(max-site-weight / B) x 100
    assert update_norm_bound(RunConfig(dp=False, momentum=0.5, local_epochs=2, max_site_weight=100, batch_size=64), learning_rate=0.1, parameters=10) == pytest.approx(0.2 * 2 * 2 * 100)
    # DP with sites of at most one batch: k = 1, b = 1, mass E
    cfg = RunConfig(dp=True, noise_multiplier=1.5, max_grad_norm=2.0, max_site_weight=64, batch_size=64)
    assert update_norm_bound(cfg, learning_rate=0.5, parameters=10_000) == pytest.approx(0.5 * 2.0 * (1 + 1.5 * (100 + NOISE_TAIL)))
    assert update_norm_bound(RunConfig(client_dp=True, client_clip_norm=0.7), learning_rate=0.5, parameters=10) == 0.7
    assert update_norm_bound(RunConfig(max_update_norm=3.0), learning_rate=0.5, parameters=10) == 3.0
