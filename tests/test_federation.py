"""The server's strategy: weighted averaging by hand, epsilon as a maximum, failing closed."""

from __future__ import annotations

import time

import numpy as np
import torch
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedmm import protocol
from fedmm.errors import FederationError
from fedmm.federation import FedMMAvg


def _reply(node: int, *, content: RecordDict | None = None, error: str | None = None, code: int = 1) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"q{node}",
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )
    if error is not None:
        return Message(error=Error(code=code, reason=error), metadata=metadata)
    return Message(content=content, metadata=metadata)


def _site_reply(node: int, site: str, weight: np.ndarray, n: int, loss: float, epsilon: float) -> Message:
    return _reply(node, content=RecordDict({
        protocol.ARRAYS: ArrayRecord({"w": torch.from_numpy(weight)}),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: loss, protocol.EPSILON: epsilon}),
        protocol.PRIVACY: ConfigRecord({
            protocol.SITE: site, protocol.EPSILON: epsilon, protocol.DELTA: 1e-5, protocol.ACCOUNTANT: "rdp",
            protocol.NOISE_MULTIPLIER: 1.0, protocol.SAMPLE_RATE: 0.1, protocol.STEPS: 10,
        }),
    }))


def test_weighted_average_without_dp() -> None:
    strategy = FedMMAvg(dp=False, sites=3)
    replies = [
        _site_reply(1, "a", np.array([1.0, 0.0]), 100, 1.0, 0.0),
        _site_reply(2, "b", np.array([3.0, 1.0]), 300, 2.0, 0.0),
        _site_reply(3, "c", np.array([0.0, 4.0]), 100, 3.0, 0.0),
    ]

    arrays, metrics = strategy.aggregate_train(1, replies)

    expected = (100 * np.array([1.0, 0.0]) + 300 * np.array([3.0, 1.0]) + 100 * np.array([0.0, 4.0])) / 500
    assert np.allclose(arrays["w"].numpy(), expected)
    assert metrics[protocol.TRAIN_LOSS] == pytest.approx((100 * 1.0 + 300 * 2.0 + 100 * 3.0) / 500)
    assert strategy.max_epsilon is None


def test_under_dp_every_weight_is_one_and_epsilon_is_a_maximum() -> None:
    strategy = FedMMAvg(dp=True, sites=3)
    replies = [
        _site_reply(1, "a", np.array([1.0, 0.0]), 1, 1.0, 2.0),
        _site_reply(2, "b", np.array([3.0, 1.0]), 1, 2.0, 7.5),
        _site_reply(3, "c", np.array([0.0, 4.0]), 1, 3.0, 3.0),
    ]

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert np.allclose(arrays["w"].numpy(), [4 / 3, 5 / 3])
    assert metrics[protocol.EPSILON] == 7.5
    assert strategy.max_epsilon == 7.5
    assert sorted(strategy.site_privacy) == ["a", "b", "c"]


def test_a_failed_site_stops_the_round_with_its_reason() -> None:
    strategy = FedMMAvg(dp=True, sites=2)
    replies = [_site_reply(1, "a", np.ones(2), 1, 1.0, 1.0), _reply(2, error="site b refuses round 1: budget")]

    with pytest.raises(FederationError, match="1 of 2 sites failed.*site b refuses round 1"):
        strategy.aggregate_train(1, replies)


def test_a_site_lost_mid_round_is_dropped_and_the_round_goes_on_above_min_sites() -> None:
    """Flower's "Node Unavailable" (heartbeats stopped) is a dropout, as under SecAgg+; min-sites still holds."""
    lost = _reply(0, error="Error: Node Unavailable", code=5)  # answered by the SuperLink, for the node it lost
    strategy = FedMMAvg(dp=True, sites=3, min_sites=2)
    arrays, _ = strategy.aggregate_train(1, [_site_reply(1, "a", np.ones(2), 1, 1.0, 1.0), _site_reply(2, "b", 3 * np.ones(2), 1, 1.0, 1.0), lost])
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 2.0)
    assert strategy.round_report["dropped"] == 1 and strategy.sites_last_round == 2
    with pytest.raises(Exception, match="min-sites=2"):
        FedMMAvg(dp=True, sites=3, min_sites=2).aggregate_train(1, [_site_reply(1, "a", np.ones(2), 1, 1.0, 1.0), lost])


def test_under_client_level_dp_a_lost_site_stops_the_run() -> None:
    """The server's noise was calibrated for the round's sample: fewer updates than sampled is not what was accounted."""
    from fedmm.privacy.client_dp import ClientDPPlan

    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=0.5, distributed=False, sample_rate=1.0, delta=1e-5, target_epsilon=None)
    strategy = FedMMAvg(dp=True, sites=2, client_dp=plan)
    lost = _reply(0, error="Error: Node Unavailable", code=5)
    with pytest.raises(FederationError, match="client-level DP"):
        strategy.aggregate_train(1, [_site_reply(1, "a", np.ones(2), 1, 1.0, 1.0), lost])


def test_no_reply_is_an_error() -> None:
    with pytest.raises(FederationError, match="no site replied"):
        FedMMAvg(dp=False, sites=1).aggregate_train(1, [])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_epsilon_is_refused(bad: float) -> None:
    strategy = FedMMAvg(dp=True, sites=2)
    replies = [_site_reply(1, "a", np.ones(2), 1, 1.0, 1.0), _site_reply(2, "b", np.ones(2), 1, 1.0, bad)]

    with pytest.raises(FederationError, match="'epsilon'"):
        strategy.aggregate_train(1, replies)


def test_an_update_with_another_model_layout_is_refused() -> None:
    from fedmm.models import layout_fingerprint

    mine = layout_fingerprint({"w": torch.zeros(2)})
    strategy = FedMMAvg(dp=True, sites=2, layout=mine)
    good, odd = _site_reply(1, "a", np.ones(2), 1, 1.0, 1.0), _site_reply(2, "b", np.ones(2), 1, 1.0, 1.0)
    good.content[protocol.MODEL] = ConfigRecord({protocol.LAYOUT: mine})
    odd.content[protocol.MODEL] = ConfigRecord({protocol.LAYOUT: layout_fingerprint({"w": torch.zeros(3)})})

    arrays, _ = strategy.aggregate_train(1, [good, odd])

    assert np.allclose(arrays["w"].numpy(), 1.0) and strategy.sites_last_round == 1
    assert strategy.rejected == {"layout": 1} and strategy.round_report["rejected"] == 1
    with pytest.raises(FederationError, match="0 update.* could be aggregated.*'layout': 2"):  # nothing left: the run stops
        strategy.aggregate_train(2, [odd])


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        (np.array([1.0, np.nan]), "non-finite"),
        (np.array([np.inf, 0.0]), "non-finite"),
        (np.ones(3), "shape"),
        (np.ones((2, 1)), "shape"),
    ],
)
def test_bad_updates_are_rejected_and_counted(bad: np.ndarray, kind: str) -> None:
    strategy = FedMMAvg(dp=True, sites=3, reference={"w": (2,)})
    replies = [_site_reply(1, "a", np.zeros(2), 1, 1.0, 1.0), _site_reply(2, "b", bad, 1, 1.0, 1.0), _site_reply(3, "c", np.full(2, 2.0), 1, 1.0, 1.0)]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert np.allclose(arrays["w"].numpy(), 1.0)  # the two good updates only
    assert strategy.rejected == {kind: 1} and strategy.sites_last_round == 2
    # The site trained and spent its budget before its update was found unusable: the spend is reported.
    assert strategy.site_privacy["b"].epsilon == 1.0 and strategy.max_epsilon == 1.0


def test_client_dp_rejects_norms_beyond_the_clip_and_noises_the_sum() -> None:
    from fedmm.privacy.client_dp import ClientDPPlan

    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=0.5, distributed=False, sample_rate=1.0, delta=1e-5, target_epsilon=None)
    strategy = FedMMAvg(dp=True, sites=3, reference={"w": (20000,)}, client_dp=plan)
    strategy.configure_train = lambda *a: None  # type: ignore[method-assign]
    strategy._global = {"w": np.zeros(20000, dtype=np.float32)}
    strategy.round_report = {"eligible": 3}
    within = np.zeros(20000, np.float32)  # the global model's dtype: sites send float32 updates
    within[0] = 0.9
    beyond = np.zeros(20000, np.float32)
    beyond[0] = 1.5
    replies = [_site_reply(1, "a", within, 1, 1.0, 1.0), _site_reply(2, "b", within, 1, 1.0, 1.0), _site_reply(3, "c", beyond, 1, 1.0, 1.0)]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert strategy.rejected == {"norm": 1}
    step = arrays["w"].numpy()
    # sum of the two accepted updates plus N(0, (0.5 * 1.0)^2), divided by the 3 sites asked
    assert np.std(step[1:]) == pytest.approx(0.5 / 3, rel=0.03)
    assert strategy.client_accountant is not None and strategy.client_accountant.rounds == 1


def _refusal(node: int, site: str, reason: str) -> Message:
    return _reply(node, content=RecordDict({
        protocol.REFUSED: ConfigRecord({protocol.SITE: site, protocol.REASON: reason, protocol.EPSILON: 1.9, protocol.BUDGET: 2.0}),
    }))


def test_a_site_out_of_budget_drops_out_and_the_others_go_on() -> None:
    strategy = FedMMAvg(dp=True, sites=3, min_sites=2)
    strategy.aggregate_train(1, [_site_reply(n, s, np.ones(2), 1, 1.0, 1.5) for n, s in ((1, "a"), (2, "b"), (3, "c"))])

    arrays, _ = strategy.aggregate_train(2, [
        _site_reply(1, "a", np.zeros(2), 1, 1.0, 1.9), _site_reply(2, "b", np.full(2, 2.0), 1, 1.0, 1.9),
        _refusal(3, "c", "site c refuses round 2: over its budget"),
    ])

    assert np.allclose(arrays["w"].numpy(), 1.0)  # the average of the two updates only
    assert strategy.refused_nodes == {3} and strategy.site_privacy["c"].refused == "site c refuses round 2: over its budget"
    assert strategy.site_privacy["c"].epsilon == 1.5  # its last reported spend stays on record
    with pytest.raises(FederationError, match="fewer than min-sites=2"):  # then one more leaves: too few
        strategy.aggregate_train(3, [_site_reply(1, "a", np.zeros(2), 1, 1.0, 2.5), _refusal(2, "b", "site b refuses round 3")])


def test_sites_that_refused_are_not_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from flwr.serverapp.strategy import FedAvg

    def fedavg_messages(self: FedAvg, *args: object) -> list[SimpleNamespace]:  # FedAvg samples every node
        return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node)) for node in (7, 8)]

    monkeypatch.setattr(FedAvg, "configure_train", fedavg_messages)
    strategy = FedMMAvg(dp=True, sites=2)
    strategy.refused_nodes = {7}

    messages = strategy.configure_train(2, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord({}), None)  # type: ignore[arg-type]

    assert [m.metadata.dst_node_id for m in messages] == [8]


def test_a_round_that_stops_below_min_sites_still_reports_what_its_sites_spent() -> None:
    strategy = FedMMAvg(dp=True, sites=3, min_sites=3)
    replies = [_site_reply(1, "a", np.ones(2), 1, 1.0, 2.5), _site_reply(2, "b", np.ones(2), 1, 1.0, 3.5), _refusal(3, "c", "site c refuses round 1")]

    with pytest.raises(FederationError, match="fewer than min-sites=3"):
        strategy.aggregate_train(1, replies)

    assert strategy.max_epsilon == 3.5 and sorted(strategy.site_privacy) == ["a", "b", "c"]  # c's refusal is on record too
    refused = strategy.site_privacy["c"]
    assert refused.epsilon == 1.9 and refused.epsilon_budget == 2.0 and refused.refused == "site c refuses round 1" and refused.steps == 0


def test_a_site_that_refuses_the_first_round_it_is_asked_is_on_record_with_its_spend() -> None:
    """Privacy-officer finding: a site that refused before it ever reported was missing from privacy.json (and from
    --witness), though its refusal states its lifetime epsilon and budget."""
    strategy = FedMMAvg(dp=True, sites=3, min_sites=1)
    strategy.aggregate_train(1, [_site_reply(1, "a", np.ones(2), 1, 1.0, 1.5), _refusal(3, "c", "site c refuses round 1: over its budget")])

    assert strategy.site_privacy["c"].epsilon == 1.9 and strategy.max_epsilon == 1.9 and 3 in strategy.refused_nodes


def test_a_round_that_fails_still_reports_what_the_other_sites_spent() -> None:
    strategy = FedMMAvg(dp=True, sites=3)
    replies = [_site_reply(1, "a", np.ones(2), 1, 1.0, 4.0), _reply(2, error="site b crashed"), _site_reply(3, "c", np.ones(2), 1, 1.0, 1.0)]

    with pytest.raises(FederationError, match="1 of 3 sites failed"):
        strategy.aggregate_train(1, replies)

    assert strategy.max_epsilon == 4.0 and sorted(strategy.site_privacy) == ["a", "c"]


def test_a_malformed_report_fails_the_round_after_every_good_report_is_kept() -> None:
    strategy = FedMMAvg(dp=True, sites=3)
    replies = [_site_reply(1, "a", np.ones(2), 1, 1.0, float("nan")), _site_reply(2, "b", np.ones(2), 1, 1.0, 6.0)]

    with pytest.raises(FederationError, match="'epsilon'"):
        strategy.aggregate_train(1, replies)

    assert strategy.max_epsilon == 6.0


def test_a_sites_epsilon_on_record_never_falls() -> None:
    strategy = FedMMAvg(dp=True, sites=1)
    strategy.aggregate_train(1, [_site_reply(1, "a", np.ones(2), 1, 1.0, 3.0)])

    strategy.aggregate_train(2, [_site_reply(1, "a", np.ones(2), 1, 1.0, 2.0)])  # a lower report (another delta, a stale copy)

    assert strategy.max_epsilon == 3.0
