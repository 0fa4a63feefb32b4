"""Secure aggregation with Flower's SecAgg+: what the server holds, dropouts, client-level DP noise.

Every test runs Flower's own SecAgg+ server workflow and client mod, with real keys and
masks, through :class:`fedmm.runtime.local.LocalGrid` (ClientApps called in-process).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.errors import FederationError, PrivacyError
from fedmm.runtime.local import LocalGrid, stage_of
from fedmm.federation.secagg import SecureFedMM, make_workflow, secagg_params, secure_fit_reply
from fedmm.secure.update import prepare_update

SIZE = 4000
LAYOUT = "test-layout"


def _updates(sites: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {101 + i: rng.normal(0.0, 0.05, SIZE).astype(np.float32) for i in range(sites)}


def _weights(sites: int) -> dict[int, int]:
    return {101 + i: 50 + 25 * i for i in range(sites)}


def _protocol_app(
    cfg: RunConfig, updates: dict[int, np.ndarray], weights: dict[int, int], refuse: set[int] = frozenset(), claims: dict[int, object] | None = None,
) -> ClientApp:
    """Sites whose training is replaced by a known update; everything after training is fedmm's and Flower's.

    ``claims``: the weight a site declares in its plain metrics, where it is not the one it masks.
    """
    app = ClientApp()

    def fit(msg: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        (global_w,) = parameters_to_ndarrays(fitins.parameters)
        node = context.node_id
        refused = node in refuse
        local = {"w": torch.from_numpy(global_w + (0.0 if refused else updates[node]))}
        weight = (1 if cfg.client_dp else 0) if refused else (1 if cfg.dp else weights[node])  # under DP every site weighs 1, as fedmm's do
        out = prepare_update(local, {"w": global_w}, cfg, weight=weight, secagg=secagg_params(context))
        claim = (claims or {}).get(node, weight)
        metrics = {protocol.TRAIN_LOSS: 1.0, protocol.LAYOUT: LAYOUT, protocol.NUM_EXAMPLES: claim}
        if cfg.dp:  # the site's privacy report rides in its plain metrics, as fedmm's ClientApp sends it
            metrics.update({
                protocol.SITE: f"site-{node}", protocol.EPSILON: node / 100, protocol.DELTA: 1e-5, protocol.ACCOUNTANT: "rdp",
                protocol.NOISE_MULTIPLIER: 1.0, protocol.SAMPLE_RATE: 0.1, protocol.STEPS: 10,
            })
        if refused:
            metrics = {protocol.SITE: f"site-{node}", protocol.REASON: "out of budget", protocol.EPSILON: 1.0, protocol.BUDGET: 1.0}
        reply = secure_fit_reply(arrays=list(out.arrays.values()), weight=out.weight, metrics=metrics)
        return Message(compat.fitres_to_recorddict(reply, keep_input=False), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        assert RECORD_KEY_CONFIGS in msg.content.config_records, "every message of a SecAgg+ round carries its stage"
        return secaggplus_mod(msg, context, fit)

    return app


_STRATEGIES: dict[int, SecureFedMM] = {}  # id(grid) -> the strategy of its last round, for rounds that raise


def grid_strategy(grid: LocalGrid) -> SecureFedMM:
    return _STRATEGIES[id(grid)]


def _run_round(cfg: RunConfig, grid: LocalGrid, initial: np.ndarray | None = None) -> SecureFedMM:
    strategy = _STRATEGIES[id(grid)] = SecureFedMM(
        cfg, initial={"w": np.zeros(SIZE, np.float32) if initial is None else initial}, train_config={}, layout=LAYOUT,
        evaluate_fn=lambda r, arrays: MetricRecord({"loss": 0.0, "accuracy": 0.0}),
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=make_workflow(cfg, strategy))(grid, legacy)
    return strategy


def _config(sites: int, **changes: object) -> RunConfig:
    return RunConfig(**{"sites": sites, "dp": False, "secure_aggregation": True, **changes})  # type: ignore[arg-type]


def _weighted_mean(updates: dict[int, np.ndarray], weights: dict[int, int], nodes: set[int]) -> np.ndarray:
    total = sum(weights[n] for n in nodes)
    return sum(weights[n] * updates[n].astype(np.float64) for n in nodes) / total


def _bound(cfg: RunConfig, weights: dict[int, int], nodes: set[int]) -> float:
    """SecAgg+'s worst-case error on the weighted mean: one quantisation step per site, over the summed weight ratios."""
    step = 2 * cfg.secagg_clip_range / 2**22
    ratio = sum(weights[n] / cfg.secagg_max_weight for n in nodes)
    return len(nodes) * step / ratio + 1e-7  # + float32 rounding of the stored model


def test_the_server_never_holds_one_sites_update_and_the_aggregate_is_fedavgs() -> None:
    cfg = _config(5)
    updates, weights = _updates(5), _weights(5)
    grid = LocalGrid(_protocol_app(cfg, updates, weights), [{}] * 5, {}, record=True)

    strategy = _run_round(cfg, grid)

    # The aggregate equals plain FedAvg within SecAgg+'s quantisation error.
    expected = _weighted_mean(updates, weights, set(updates))
    assert np.max(np.abs(strategy.global_arrays["w"] - expected)) <= _bound(cfg, weights, set(updates))
    assert strategy.round_report["dropped"] == 0 and strategy.sites_last_round == 5
    # What the server held: per stage, one reply per site; no reply carries a tensor except the
    # masked vectors, and each masked vector is uniform noise with no trace of its site's update.
    stages = [stage for _, stage, _ in grid.received]
    assert stages.count("setup") == stages.count("share_keys") == stages.count("collect_masked_vectors") == stages.count("unmask") == 5
    for node, stage, content in grid.received:
        assert all(len(record) == 0 for record in content.array_records.values()), f"{stage} reply of {node} carried tensors"
        if stage != "collect_masked_vectors":
            continue
        factor, masked = (bytes_to_ndarray(b) for b in content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
        assert masked.shape == (SIZE,)
        assert abs(masked.mean() / 2**32 - 0.5) < 0.02  # uniform on [0, 2^32)
        for other, update in updates.items():
            # Independent of the update, the correlation of SIZE pairs is about N(0, 1/SIZE): 6 standard
            # deviations (0.095) fail by chance about once in 10^9 comparisons (0.06, 3.8 sd, failed once in
            # CI: 25 comparisons a run); an unmasked update correlates near 1.
            bound = 6 / np.sqrt(SIZE)
            assert abs(np.corrcoef(masked.astype(np.float64), update)[0, 1]) < bound, f"node {node}'s masked vector correlates with site {other}'s update"
        assert int(factor[0]) != round(weights[node] / cfg.secagg_max_weight * 2**22)  # even its weight is masked


def test_ten_sites_three_drop_out_mid_round_and_the_survivors_aggregate_is_correct() -> None:
    cfg = _config(10)
    updates, weights = _updates(10, seed=1), _weights(10)
    gone = {103, 106, 109}
    grid = LocalGrid(_protocol_app(cfg, updates, weights), [{}] * 10, {}, drop=lambda node, msg: node in gone and stage_of(msg) == "collect_masked_vectors")

    strategy = _run_round(cfg, grid)

    survivors = set(updates) - gone
    expected = _weighted_mean(updates, weights, survivors)
    assert np.max(np.abs(strategy.global_arrays["w"] - expected)) <= _bound(cfg, weights, survivors)
    assert strategy.round_report["dropped"] == 3 and strategy.sites_last_round == 7
    assert strategy.threshold == 7  # round(0.67 * 10)


@pytest.mark.parametrize("stage", ["setup", "share_keys"])
def test_a_site_lost_before_the_masks_exist_leaves_the_round_to_the_others(stage: str) -> None:
    cfg = _config(3)
    updates, weights = _updates(3, seed=7), _weights(3)
    grid = LocalGrid(_protocol_app(cfg, updates, weights), [{}] * 3, {}, drop=lambda node, msg: node == 103 and stage_of(msg) == stage)

    strategy = _run_round(cfg, grid)

    assert strategy.round_report["dropped"] == 1 and strategy.sites_last_round == 2
    assert np.max(np.abs(strategy.global_arrays["w"] - _weighted_mean(updates, weights, {101, 102}))) <= _bound(cfg, weights, {101, 102})


def test_a_site_lost_after_sending_its_masked_vector_is_still_counted() -> None:
    cfg = _config(6)
    updates, weights = _updates(6, seed=2), _weights(6)
    grid = LocalGrid(_protocol_app(cfg, updates, weights), [{}] * 6, {}, drop=lambda node, msg: node == 102 and stage_of(msg) == "unmask")

    strategy = _run_round(cfg, grid)

    assert np.max(np.abs(strategy.global_arrays["w"] - _weighted_mean(updates, weights, set(updates)))) <= _bound(cfg, weights, set(updates))


def test_more_dropouts_than_the_threshold_allows_fail_the_round_cleanly() -> None:
    cfg = _config(10)
    updates, weights = _updates(10, seed=3), _weights(10)
    gone = {101, 102, 103, 104}
    grid = LocalGrid(_protocol_app(cfg, updates, weights), [{}] * 10, {}, drop=lambda node, msg: node in gone and stage_of(msg) == "collect_masked_vectors")

    with pytest.raises(FederationError, match="round 1: secure aggregation could not finish: of 10 sites asked.*threshold"):
        _run_round(cfg, grid)


def test_a_masked_vector_of_the_wrong_shape_is_rejected_before_the_sum() -> None:
    cfg = _config(4)
    updates, weights = _updates(4, seed=4), _weights(4)
    app = _protocol_app(cfg, updates, weights)

    grid = LocalGrid(app, [{}] * 4, {})
    original = grid.app

    def truncating_app(msg: Message, context: Context) -> Message:
        stage = stage_of(msg)
        reply = original(msg, context)
        if context.node_id == 104 and stage == "collect_masked_vectors":
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            record[Key.MASKED_PARAMETERS] = list(record[Key.MASKED_PARAMETERS])[:1]  # the factor only
        return reply

    grid.app = truncating_app  # type: ignore[assignment]

    strategy = _run_round(cfg, grid)

    assert strategy.rejected == {"shape": 1} and strategy.sites_last_round == 3
    assert np.max(np.abs(strategy.global_arrays["w"] - _weighted_mean(updates, weights, {101, 102, 103}))) <= _bound(cfg, weights, {101, 102, 103})


def test_a_rejected_masked_vector_still_reports_what_its_site_spent() -> None:
    cfg = _config(4, dp=True)
    app = _protocol_app(cfg, _updates(4, seed=4), _weights(4))
    grid = LocalGrid(app, [{}] * 4, {})
    original = grid.app

    def truncating_app(msg: Message, context: Context) -> Message:
        stage = stage_of(msg)
        reply = original(msg, context)
        if context.node_id == 104 and stage == "collect_masked_vectors":
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            record[Key.MASKED_PARAMETERS] = list(record[Key.MASKED_PARAMETERS])[:1]
        return reply

    grid.app = truncating_app  # type: ignore[assignment]

    strategy = _run_round(cfg, grid)

    assert strategy.rejected == {"shape": 1} and strategy.sites_last_round == 3
    assert strategy.max_epsilon == 1.04 and sorted(strategy.site_privacy) == ["site-101", "site-102", "site-103", "site-104"]


def test_a_round_stopped_before_unmasking_still_reports_what_its_sites_spent() -> None:
    from fedmm.errors import SitesExhausted

    cfg = _config(3, dp=True, min_sites=3)
    grid = LocalGrid(_protocol_app(cfg, _updates(3, seed=6), _weights(3), refuse={101}), [{}] * 3, {})

    with pytest.raises(SitesExhausted, match="2 site.* trained.*min-sites=3"):
        _run_round(cfg, grid)

    strategy = grid_strategy(grid)
    assert strategy.max_epsilon == 1.03 and sorted(strategy.site_privacy) == ["site-101", "site-102", "site-103"]
    assert strategy.site_privacy["site-101"].refused == "out of budget" and strategy.site_privacy["site-101"].epsilon == 1.0  # its refusal, on record


def test_a_round_that_cannot_be_unmasked_still_reports_what_its_sites_spent() -> None:
    cfg = _config(10, dp=True)
    gone = {101, 102, 103, 104}
    grid = LocalGrid(_protocol_app(cfg, _updates(10, seed=3), _weights(10)), [{}] * 10, {}, drop=lambda node, msg: node in gone and stage_of(msg) == "unmask")

    with pytest.raises(FederationError, match="secure aggregation could not finish"):
        _run_round(cfg, grid)

    strategy = grid_strategy(grid)
    assert strategy.max_epsilon == 1.1 and len(strategy.site_privacy) == 10  # every masked vector came with its report


def test_values_beyond_the_quantisation_range_are_clipped_on_purpose() -> None:
    cfg = _config(3, secagg_clip_range=0.01)
    updates, weights = _updates(3, seed=5), _weights(3)
    grid = LocalGrid(_protocol_app(cfg, updates, weights), [{}] * 3, {})

    strategy = _run_round(cfg, grid)

    bounds = {n: 0.01 / (round(w / cfg.secagg_max_weight * 2**22) / 2**22) for n, w in weights.items()}
    assert sum(int(np.sum(np.abs(u) > bounds[n])) for n, u in updates.items()) > 0
    clipped = {n: np.clip(u, -bounds[n], bounds[n]) for n, u in updates.items()}
    assert np.max(np.abs(strategy.global_arrays["w"] - _weighted_mean(clipped, weights, set(updates)))) <= _bound(cfg, weights, set(updates))


@pytest.mark.parametrize("gone", [set(), {102, 105, 108}])
def test_distributed_noise_never_falls_below_the_accounted_noise_when_sites_drop(gone: set[int]) -> None:
    cfg = _config(10, client_dp=True, client_noise="distributed", client_noise_multiplier=1.0, client_clip_norm=1.0)
    zero = {n: np.zeros(SIZE * 5, np.float32) for n in range(101, 111)}
    grid = LocalGrid(_protocol_app(cfg, zero, _weights(10)), [{}] * 10, {}, drop=lambda node, msg: node in gone and stage_of(msg) == "collect_masked_vectors")

    strategy = _run_round(cfg, grid, initial=np.zeros(SIZE * 5, np.float32))

    # The sum of m shares of variance sigma^2 S^2 / t has std sqrt(m / t) sigma S >= sigma S; the step divides by the 10 sites asked.
    m, t = 10 - len(gone), strategy.threshold
    std = float(np.std(strategy.global_arrays["w"]))
    assert std == pytest.approx(math.sqrt(m / t) / 10, rel=0.03)
    assert std >= 0.1 * 0.97
    assert strategy.client_accountant is not None and strategy.client_accountant.rounds == 1


def test_refusing_sites_still_add_their_noise_share() -> None:
    cfg = _config(6, client_dp=True, client_noise="distributed")
    zero = {n: np.zeros(SIZE * 5, np.float32) for n in range(101, 107)}
    grid = LocalGrid(_protocol_app(cfg, zero, _weights(6), refuse={101, 102, 103}), [{}] * 6, {})

    strategy = _run_round(cfg, grid, initial=np.zeros(SIZE * 5, np.float32))

    assert strategy.sites_last_round == 3 and strategy.refused_nodes == {101, 102, 103}
    assert float(np.std(strategy.global_arrays["w"])) == pytest.approx(math.sqrt(6 / strategy.threshold) / 6, rel=0.03)


def test_a_sum_of_one_update_is_never_unmasked() -> None:
    from fedmm.errors import SitesExhausted

    cfg = _config(3)
    updates, weights = _updates(3, seed=6), _weights(3)
    grid = LocalGrid(_protocol_app(cfg, updates, weights, refuse={101, 102}), [{}] * 3, {}, record=True)

    with pytest.raises(SitesExhausted, match="1 site.* trained.*masks were not removed"):
        _run_round(cfg, grid)

    assert "unmask" not in [stage for _, stage, _ in grid.received]  # no share that could remove a mask was asked for


def test_under_noised_sums_are_never_used() -> None:
    from fedmm.federation import FederationBook
    from fedmm.privacy.client_dp import ClientDPPlan

    plan = ClientDPPlan(clip_norm=1.0, noise_multiplier=1.0, distributed=True, sample_rate=1.0, delta=1e-5, target_epsilon=None)
    book = FederationBook(dp=False, client_dp=plan)
    with pytest.raises(PrivacyError, match="under-noised"):
        book.privatise(3, {"w": np.zeros(3)}, updates=4, noise_parties=5)
    assert book.client_accountant is not None and book.client_accountant.rounds == 0


def test_a_private_secure_run_end_to_end_with_fedmm_sites(tmp_path: Path) -> None:
    """fedmm's own ServerApp and ClientApp: SecAgg+, distributed client-level noise, sample-level DP, ledgers."""
    import json

    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent, rdp
    from opacus.accountants.rdp import RDPAccountant

    import server.app as server_app
    from clients.app import app as client_app
    from fedmm.privacy.audit import audit_ledger
    from fedmm.privacy.ledger import find_ledgers

    cfg = RunConfig(
        data="synthetic:400", sites=4, rounds=3, secure_aggregation=True, client_dp=True, client_noise="distributed",
        client_noise_multiplier=2.0, client_clip_norm=0.5, runs_dir=str(tmp_path), run_name="secure",
    )
    run_config = cfg.to_run_config()
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 4} for i in range(4)], run_config)

    server_app.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))

    run = tmp_path / "secure"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["client_dp"] is True and summary["rounds"] == 3
    reference = rdp.RdpAccountant(orders=np.array(RDPAccountant.DEFAULT_ALPHAS))
    reference.compose(SelfComposedDpEvent(GaussianDpEvent(2.0), 3))
    assert summary["client_epsilon"] == pytest.approx(reference.get_epsilon(cfg.client_delta), rel=0.01)
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rounds] == [0, 0, 0] and all(r["rejected"] == 0 and r["sites"] == 4 for r in rounds)
    assert rounds[0]["client_epsilon"] < rounds[1]["client_epsilon"] < rounds[2]["client_epsilon"] == summary["client_epsilon"]
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["client_level"]["noise"] == "distributed" and len(privacy["sites"]) == 4
    ledgers = find_ledgers([run / "sites"])
    assert len(ledgers) == 4
    for path in ledgers:
        report = audit_ledger(path)
        assert report.ok and len(report.entries) == 3, report


@pytest.mark.parametrize(("sites", "shares", "threshold"), [(2, 1.0, 0.67), (3, 1.0, 0.67), (5, 1.0, 0.67), (7, 0.5, 0.8), (7, 5.0, 3.0)])
def test_the_plans_threshold_is_flowers(sites: int, shares: float, threshold: float) -> None:
    # fedmm.privacy.client_dp mirrors the threshold Flower's SecAgg+ sets, to bound each site's noise share.
    from fedmm.privacy.client_dp import secagg_threshold

    cfg = _config(sites, secagg_shares=shares, secagg_threshold=threshold)
    strategy = _run_round(cfg, LocalGrid(_protocol_app(cfg, _updates(sites), _weights(sites)), [{}] * sites, {}))

    assert strategy.threshold == secagg_threshold(shares, threshold, sites)


# ---------------------------------------------------------------- issue 17: what the server checks of a dishonest site

@pytest.mark.parametrize(("claim", "dp"), [(0, False), (-99, False), (10**12, False), (1.5, False), (100, True)])
def test_a_declared_weight_out_of_the_agreed_range_is_rejected_before_the_sum(claim: object, dp: bool) -> None:
    cfg = _config(4, dp=dp)
    updates, weights = _updates(4, seed=8), _weights(4)
    grid = LocalGrid(_protocol_app(cfg, updates, weights, claims={104: claim}), [{}] * 4, {})

    strategy = _run_round(cfg, grid)

    site = "site-104" if dp else "node-104"  # the name a reply gives (its privacy report), else its node
    assert strategy.rejected == {"weight": 1} and strategy.rejected_by_site == {site: {"weight": 1}}
    assert strategy.sites_last_round == 3 and strategy.round_report["dropped"] == 1
    if not dp:
        assert np.max(np.abs(strategy.global_arrays["w"] - _weighted_mean(updates, weights, {101, 102, 103}))) <= _bound(cfg, weights, {101, 102, 103})


def test_a_masked_vector_of_another_dtype_is_rejected_before_the_sum() -> None:
    from flwr.common import ndarray_to_bytes

    cfg = _config(4)
    grid = LocalGrid(_protocol_app(cfg, _updates(4, seed=9), _weights(4)), [{}] * 4, {})
    original = grid.app

    def float_app(msg: Message, context: Context) -> Message:
        stage = stage_of(msg)
        reply = original(msg, context)
        if context.node_id == 102 and stage == "collect_masked_vectors":
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(bytes_to_ndarray(b).astype(np.float64)) for b in record[Key.MASKED_PARAMETERS]]
        return reply

    grid.app = float_app  # type: ignore[assignment]

    strategy = _run_round(cfg, grid)

    assert strategy.rejected == {"dtype": 1} and [r.node for r in strategy.rejections] == [102] and strategy.sites_last_round == 3


def test_masked_weights_that_sum_to_zero_stop_the_run_clearly() -> None:
    cfg = _config(3)
    updates = _updates(3, seed=10)
    weights = {101: 50, 102: 75, 103: -125}  # site 103 masks a weight that cancels the others', and declares 100

    grid = LocalGrid(_protocol_app(cfg, updates, weights, claims={103: 100}), [{}] * 3, {})

    with pytest.raises(FederationError, match="unmasked aggregate is unusable.*NaN or infinite.*summed weight of zero.*not applied"):
        _run_round(cfg, grid)
    assert grid_strategy(grid).latest_arrays is None  # nothing was applied


def test_a_mean_update_beyond_the_norm_bound_is_not_applied() -> None:
    cfg = _config(3, max_update_norm=0.1)  # the updates here have norm ~3.2
    grid = LocalGrid(_protocol_app(cfg, _updates(3, seed=11), _weights(3)), [{}] * 3, {})

    with pytest.raises(FederationError, match="mean update's L2 norm .* above max-update-norm 0.1"):
        _run_round(cfg, grid)
    assert grid_strategy(grid).latest_arrays is None


def test_robust_rules_are_refused_with_secure_aggregation() -> None:
    from fedmm.errors import ConfigError

    with pytest.raises(ConfigError, match="aggregation.*only their sum"):
        _config(5, aggregation="median")


def test_a_sites_count_of_clipped_values_stays_in_its_log(caplog: pytest.LogCaptureFixture) -> None:
    """Curious-server finding: each site sent, outside the masked sum, how many of its update values exceeded the
    server-chosen clip range: with ranges of its choosing a server learnt how one site's values spread."""
    import logging

    from fedmm.site.clientapp import fit_metrics
    from fedmm.site.io import RoundResponse

    response = RoundResponse(site="george", metrics={protocol.TRAIN_LOSS: 1.0}, layout=LAYOUT, clipped_values=990)
    with caplog.at_level(logging.WARNING, logger="fedmm.site"):
        metrics = fit_metrics(response)
    assert protocol.CLIPPED_VALUES not in metrics and 990 not in metrics.values()
    assert "990 update value(s) clipped" in caplog.text
