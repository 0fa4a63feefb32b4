"""What a deployed site's failure tells the server: that it failed, and the error's kind; nothing from its data.

A site builds its classes from its own labels (``classes`` empty) and its sensor length from its
own longest series (``sensor-length=auto``). Before, a site lacking one of the federation's
classes failed, a site with one long record failed, and the error Flower forwards to the server
carried the site's class list, its series shape or its exact counts. Now a site fits its data to
the server's model input, and what cannot be fitted fails with a fixed text; the details stay in
the site's log.
"""

from __future__ import annotations

import csv
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.data.normalise import normalise
from fedmm.data.schema import MultimodalDataset, Schema
from fedmm.data.sources import load_source
from fedmm.errors import ConfigError, FederationError, PrivacyError
from fedmm.plan import RunPlan
from fedmm.privacy.ledger import PrivacyLedger
from fedmm.site import runner
from fedmm.site import io
from fedmm.site.data import site_data
from fedmm.site.io import RoundRequest
from fedmm.site.runner import run_round

LENGTH = 16  # the server's series length (sensor-length=auto: its held-out set's longest)
CLASSES = ("a", "b", "c")


def _manifest(folder: Path, name: str, rows: list[tuple[str, int]], split: str = "train") -> str:
    """A sensor manifest of ``rows`` (label, series length), one two-channel series a row."""
    rng = np.random.default_rng(len(rows))
    (folder / "s").mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sensor:acc", "label", "split"])
        writer.writeheader()
        for i, (label, length) in enumerate(rows):
            np.save(folder / "s" / f"{name}-{i}.npy", rng.normal(size=(2, length)).astype(np.float32))
            writer.writerow({"sensor:acc": f"s/{name}-{i}.npy", "label": label, "split": split})
    return f"manifest:{folder / name}.csv"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], str, dict[str, np.ndarray]]:
    """The run config, the schema the server sends (as server/app.py makes it) and the global weights."""
    return _server_side(tmp_path_factory.mktemp("server"))


def _server_side(folder: Path, **extra: object) -> tuple[dict[str, object], str, dict[str, np.ndarray]]:
    spec = _manifest(folder, "server", [(c, LENGTH) for c in CLASSES * 4], split="test")
    run = {"data": spec, "rounds": 2, "sites": 1, "batch-size": 4, "target-epsilon": 8.0, **extra}
    plan = RunPlan.from_run_config(run)
    cfg, recipe = plan.config, plan.model
    source = load_source(cfg.data, plan.preprocessing, classes=cfg.class_list, lenient=cfg.lenient, test_fraction=cfg.test_fraction)
    test = normalise(source.require_test(), sensor_norm=cfg.sensor_norm, site_statistics=not cfg.dp, held_out=True)
    schema = recipe.prepare(test, tasks_from=recipe.task_classes(test)).schema
    weights = {k: v.numpy() for k, v in recipe.build(schema, seed=cfg.seed).state_dict().items()}
    return run, schema.to_json(), weights


def _request(folder: Path, spec: str, server: tuple[dict[str, object], str, dict[str, np.ndarray]], *, lenient: bool = False, **run: object) -> RoundRequest:
    """A round's request to a deployed site 'clinic' (``lenient``: the site's own setting, in its node config)."""
    run_config, schema, weights = server
    state = folder / "state"
    if not (state / "ledger.sqlite").exists():
        PrivacyLedger.create(state / "ledger.sqlite", site="clinic").close()
    node = {protocol.NODE_SITE: "clinic", protocol.NODE_DATA: spec, protocol.NODE_STATE_DIR: str(state), protocol.NODE_EPSILON_BUDGET: 20.0,
            protocol.NODE_MIN_BATCH: 1, protocol.NODE_LENIENT: lenient}  # these sites take the small batches of these tests
    config = {protocol.SERVER_ROUND: 1, protocol.SCHEMA: schema, protocol.RUN_ID: "study-1"}
    runner._DATA.clear()
    return RoundRequest(run_config={**run_config, **run}, node_config=node, config=config, global_weights=weights, node_id=7)


def _reason(err: BaseException) -> str:
    """What Flower sends the server as the reply's error reason for an exception raised in a ClientApp."""
    return str(type(err)) + ":<'" + str(err) + "'>"


def test_a_site_missing_a_class_trains_under_the_servers_schema(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]]) -> None:
    spec = _manifest(tmp_path, "site", [("b", LENGTH), ("c", LENGTH)] * 6)  # no class 'a': non-IID, normal
    response = run_round(_request(tmp_path, spec, server))

    assert response.refused is None and np.isfinite(response.metrics[protocol.EPSILON])
    assert {k: v.shape for k, v in response.arrays.items()} == {k: v.shape for k, v in server[2].items()}
    cfg = RunPlan.from_run_config(server[0]).config
    _, data = site_data({protocol.NODE_SITE: "clinic", protocol.NODE_DATA: spec}, cfg, server=Schema.from_json(server[1]))
    assert data.schema.classes == CLASSES
    assert sorted(set(data.label.tolist())) == [1, 2]  # 'b' and 'c' keep the federation's numbers, not 0 and 1


def _own(spec: str, cfg: RunConfig) -> MultimodalDataset:
    """The site's data as it loads on its own (its own classes and length)."""
    return site_data({protocol.NODE_SITE: "clinic", protocol.NODE_DATA: spec}, cfg)[1]


def test_shorter_series_take_the_servers_length_and_one_long_record_changes_nothing(
    tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]], caplog: pytest.LogCaptureFixture
) -> None:
    short = [(c, 10) for c in CLASSES * 4]
    outcomes = []
    for name, rows in (("without", short), ("with", short + [("a", 3 * LENGTH)])):  # one record three times as long
        with caplog.at_level(logging.WARNING, logger="fedmm.site"):
            response = run_round(_request(tmp_path / name, _manifest(tmp_path / name, "site", rows), server))
        outcomes.append((response.refused, sorted(response.arrays), response.layout))
    assert outcomes[0] == outcomes[1] and outcomes[0][0] is None
    assert f"cut to the federation's sensor length {LENGTH}" in caplog.text  # the site's log says so

    cfg = RunPlan.from_run_config(server[0]).config
    own = _own(_manifest(tmp_path / "pad", "site", short), cfg)
    assert own.schema.modalities[0].shape == (2, 10)  # on its own: its own length
    from fedmm.site.data import fit_to_server

    fitted = fit_to_server(own, Schema.from_json(server[1]))
    assert fitted.features["sensor:acc"].shape[1:] == (2, LENGTH) and not fitted.features["sensor:acc"][..., 10:].any()  # zeros, as the loader pads


@pytest.mark.parametrize("lenient", [False, True])
def test_an_error_reply_carries_nothing_derived_from_the_data(
    tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]], caplog: pytest.LogCaptureFixture, lenient: bool
) -> None:
    """A label the federation lacks fails the round (strict), or leaves no record to train on (lenient: skipped):
    the server is told the same fixed text however many such records there are; the site's log has the rest."""
    reasons = []
    for n in (1, 5):
        rows = [("zebra-secret", 2 * LENGTH)] * n + ([] if lenient else [("b", LENGTH)] * 7)
        folder = tmp_path / f"{n}"
        with caplog.at_level(logging.ERROR, logger="fedmm.site"), pytest.raises(io.SiteRoundFailed) as err:
            run_round(_request(folder, _manifest(folder, "site", rows), server, lenient=lenient))
        reasons.append(_reason(err.value))
        assert err.value.__cause__ is None and not getattr(err.value, "__notes__", None)  # a deployed site: nothing attached
    assert reasons[0] == reasons[1]
    kind = "FederationError"
    assert reasons[0] == f"<class 'fedmm.site.io.SiteRoundFailed'>:<'site clinic: round 1 failed at the site ({kind}); the reason is in the site's own log, not sent to the server'>"
    for leak in ("zebra", "'a'", "'b'", "[", "{", str(LENGTH), "per_class", "skipped", "unknown label"):
        assert leak not in reasons[0]
    # the site's own log: what, where, how many, and the fix
    if lenient:
        assert "no labelled sample" in caplog.text and "'unknown label': 5" in caplog.text
    else:
        assert "'zebra-secret' (5 records)" in caplog.text and "Fix:" in caplog.text


def test_a_site_whose_data_cannot_load_tells_the_server_only_that(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]], caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "bad"
    spec = _manifest(folder, "site", [("b", LENGTH)] * 9)
    (folder / "s" / "site-6.npy").write_bytes(b"not an array")  # manifest row 8
    with caplog.at_level(logging.ERROR, logger="fedmm.site"), pytest.raises(io.SiteRoundFailed) as err:
        run_round(_request(folder, spec, server))
    assert str(err.value) == f"site clinic: round 1 failed at the site ({err.value.kind}); the reason is in the site's own log, not sent to the server"
    assert "manifest row 8" in caplog.text and str(folder) in caplog.text  # the operator sees where


def test_what_is_wrong_with_the_servers_request_keeps_its_text(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]]) -> None:
    spec = _manifest(tmp_path, "site", [("b", LENGTH)] * 4)
    request = _request(tmp_path, spec, server)
    with pytest.raises(FederationError, match="the server sent a model input schema") as err:
        run_round(RoundRequest(**{**request.__dict__, "config": {**request.config, protocol.SCHEMA: "{not json"}}))
    assert not isinstance(err.value, io.SiteRoundFailed)
    with pytest.raises(ConfigError, match="integer round number"):
        run_round(RoundRequest(**{**request.__dict__, "config": {**request.config, protocol.SERVER_ROUND: "one"}}))


def test_the_failure_travels_without_its_detail_and_a_simulated_site_shows_it_in_tracebacks() -> None:
    failure = io.SiteRoundFailed("george", 2, "DataError", detail="manifest row 7: label 'patient-4711'")
    copy = pickle.loads(pickle.dumps(failure))
    assert str(copy) == str(failure) and copy.detail == "" and "4711" not in str(failure)

    from fedmm.site.runner import _failed

    simulated = _failed(FederationError("site 0: no labelled sample ({'per_class': {'x': 3}})"), "0", 1, {protocol.NODE_PARTITION_ID: 0})
    deployed = _failed(FederationError("site 0: no labelled sample ({'per_class': {'x': 3}})"), "0", 1, {protocol.NODE_DATA: "manifest:x"})
    assert "per_class" not in str(simulated) and "per_class" in "".join(simulated.__notes__)  # flower.log's traceback: the simulating user's
    assert not getattr(deployed, "__notes__", None)


def test_a_site_whose_manifest_rows_all_name_other_sites_refuses_to_train_on_them() -> None:
    """Operator finding: a site pointed at a manifest whose 'site' column names only other sites trained on all
    of it (a warning only), spending their records under its own ledger."""
    from pathlib import Path

    import fedmm
    from fedmm.config import RunConfig
    from fedmm.errors import ConfigError
    from fedmm.site.data import site_data

    manifest = Path(fedmm.__file__).parent / "data" / "builtin" / "manifest-example" / "manifest.csv"
    node = {"site": "lucas", "data": f"manifest:{manifest}", "state-dir": "/tmp/unused", "epsilon-budget": 8}

    with pytest.raises(ConfigError, match=r"'site' column whose \d+ rows name other sites \(george, .*none this site \('lucas'\)"):
        site_data(node, RunConfig())
    assert site_data({**node, "site": "george"}, RunConfig())[0] == "george"  # its own rows: trains on those


LIMITS = "would break one of its limits (this run's target-epsilon="  # the one text the server reads for the three n-dependent checks


@pytest.mark.parametrize(("run", "limit"), [
    ({"batch-size": 1, "noise-multiplier": 1.0, "target-epsilon": 1e-3}, "over the budget target-epsilon=0.001"),  # the run's budget
    ({"batch-size": 1, "noise-multiplier": 0.5, "target-epsilon": 1000.0, "local-epochs": 5}, "over its budget epsilon-budget=20"),
    ({"batch-size": 1, "target-epsilon": 60.0}, "below this site's floor min-noise-multiplier=0.5"),  # calibrated noise under the floor
])
def test_a_refusal_tells_the_server_the_same_text_whatever_the_sites_record_count(
    tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]], caplog: pytest.LogCaptureFixture, run: dict[str, object], limit: str
) -> None:
    """Curious-server finding: a refusal's text held the projected epsilon (or the calibrated noise), both functions of
    the site's exact record count; with batch-size=1 a server told 13 records from 14, free (a refusal spends nothing)
    and as often as it liked. The server now reads the limit only; the site's log keeps the figures."""
    reasons, spent = [], []
    for n in (13, 14):
        folder = tmp_path / str(n)
        with caplog.at_level(logging.WARNING, logger="fedmm.site"):
            response = run_round(_request(folder, _manifest(folder, "site", [(CLASSES[i % 3], LENGTH) for i in range(n)]), server, **run))
        assert response.refused is not None, n
        reasons.append(response.refused)
        spent.append(len(PrivacyLedger.read(folder / "state" / "ledger.sqlite").entries()))
    assert reasons[0] == reasons[1] and LIMITS in reasons[0], reasons
    assert spent == [0, 0]
    assert limit in caplog.text  # which limit, with the figures: in the site's own log


def test_a_deployed_site_without_a_name_is_refused_not_named_by_its_datas_path(tmp_path: Path) -> None:
    """Curious-server finding: a node config with data and no site (the example in docs/privacy.md) sent the data's
    local path as the site's name, in every report and refusal."""
    spec = _manifest(tmp_path, "site", [("b", LENGTH)] * 4)
    cfg = RunPlan.from_run_config({"data": spec, "rounds": 1}).config
    with pytest.raises(ConfigError, match="node-config site.*is required with data"):
        site_data({protocol.NODE_DATA: spec}, cfg)


def test_a_deployed_site_refuses_a_batch_size_below_its_floor(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]]) -> None:
    """Curious-server finding: the sample rate 1 / ceil(n / batch) in a site's privacy report tells n to within a batch,
    and the server sets the batch: batch-size=1 gave the exact record count. A deployed site takes no batch below its
    own min-batch-size (16 unless its operator sets it)."""
    folder = tmp_path / "floor"
    request = _request(folder, _manifest(folder, "site", [(CLASSES[i % 3], LENGTH) for i in range(20)]), server, **{"batch-size": 1})
    node = {k: v for k, v in request.node_config.items() if k != protocol.NODE_MIN_BATCH}  # the default floor
    response = run_round(RoundRequest(**{**request.__dict__, "node_config": node}))
    assert response.refused is not None and "batch-size=1 is below this site's floor min-batch-size=16" in response.refused
    assert PrivacyLedger.read(folder / "state" / "ledger.sqlite").entries() == []
    response = run_round(RoundRequest(**{**request.__dict__, "config": dict(request.config), "run_config": {**request.run_config, "batch-size": 16}, "node_config": node}))
    assert response.refused is None


def test_which_check_refuses_does_not_tell_the_record_count_either(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]]) -> None:
    """Review finding: with a target-delta below the site's delta (a refusal every round) and a target-epsilon between
    what q=1 and q<1 give, the refusal named target-epsilon exactly when batch-size >= n: a binary search over batch-size
    found n for free. The data-free checks now come first, and the n-dependent ones share one text."""
    folder = tmp_path / "oracle"
    spec = _manifest(folder, "site", [(CLASSES[i % 3], LENGTH) for i in range(37)])
    reasons = set()
    for batch in (16, 36, 37, 4096):
        response = run_round(_request(folder, spec, server, **{"batch-size": batch, "noise-multiplier": 3.0, "target-epsilon": 1.47, "target-delta": 1e-6}))
        reasons.add(response.refused)
    assert len(reasons) == 1 and "weaker than the run's target-delta" in next(iter(reasons)), reasons
    assert PrivacyLedger.read(folder / "state" / "ledger.sqlite").entries() == []
    limits = {run_round(_request(folder, spec, server, **{"batch-size": b, "noise-multiplier": 3.0, "target-epsilon": 1e-3})).refused for b in (16, 37, 4096)}
    assert len(limits) == 1 and LIMITS in next(iter(limits)), limits


def test_the_servers_enrolled_name_is_not_echoed_back(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]]) -> None:
    """Review finding: the refusal repeated the server's enrolled-site string, with the site's own paths in it masked:
    a server guessing paths learnt which guess was right."""
    folder = tmp_path / "echo"
    request = _request(folder, _manifest(folder, "site", [(CLASSES[i % 3], LENGTH) for i in range(20)]), server)
    guess = f"/home/alice|{folder / 'state'}|/srv/other"
    response = run_round(RoundRequest(**{**request.__dict__, "config": {**request.config, protocol.ENROLLED: guess}}))
    assert response.refused is not None and "enrolled at the server as another site" in response.refused
    assert "alice" not in response.refused and "srv" not in response.refused and "<" not in response.refused


def test_the_sample_rate_a_site_reports_tells_its_record_count_only_roughly(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]]) -> None:
    """Curious-server finding: the report's sample rate 1 / ceil(n / batch) told the record count to within one batch
    (at batch-size=2, 13 records gave 1/7 and 15 gave 1/8). It is 1 / k now, k rounded up to 1, 2, 3, 4, 6, 8, 12, 16, ...:
    both report 1/8, and the site's DP-SGD samples at exactly that rate (Opacus charged what it reports)."""
    reported = []
    for n in (13, 15):
        folder = tmp_path / str(n)
        response = run_round(_request(folder, _manifest(folder, "site", [(CLASSES[i % 3], LENGTH) for i in range(n)]), server,
                                      **{"batch-size": 2, "noise-multiplier": 1.0, "target-epsilon": 1000.0}))
        assert response.refused is None, response.refused
        entry = PrivacyLedger.read(folder / "state" / "ledger.sqlite").entries()[-1]
        charged = json.loads(str(response.state))["accountant"]["history"]  # what Opacus' optimizer charged, step by step
        reported.append((response.privacy[protocol.SAMPLE_RATE], response.privacy[protocol.STEPS], entry.sample_rate, entry.steps, charged))
    assert reported[0] == reported[1] == (1 / 8, 8, 1 / 8, 8, [[1.0, 1 / 8, 8]]), reported


def test_a_server_that_sends_no_model_input_learns_nothing_from_whether_the_round_fails(
    tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]],
) -> None:
    """Review of 3 Dec: without the schema the site built its model from its own labels, so global weights sized for K
    classes trained (and spent) at a site holding K classes and failed, for free, elsewhere: a probe of its class count."""
    spec = _manifest(tmp_path, "site", [(c, LENGTH) for c in ("b", "c") * 6])  # two of the federation's three classes
    request = _request(tmp_path, spec, server)
    no_schema = {k: v for k, v in request.config.items() if k != protocol.SCHEMA}
    with pytest.raises(ConfigError, match=r"config key 'schema': the server sent no model input .*nothing was read or spent.*Fix: use fedmm's ServerApp") as err:
        run_round(RoundRequest(**{**request.__dict__, "config": no_schema}))
    assert not isinstance(err.value, io.SiteRoundFailed)
    assert PrivacyLedger.read(tmp_path / "state" / "ledger.sqlite").entries() == []


def test_the_server_cannot_turn_on_lenient_loading_at_a_deployed_site(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]]) -> None:
    """Review of 3 Dec: with classes='X' lenient=true from the server, a site trained on its class-X records only, and the
    sample rate in its privacy report gave their count to within 1.5x: a label histogram, one run a class, outside DP.
    Which records a site skips is the site's own setting (lenient in its site file), never the server's."""
    spec = _manifest(tmp_path, "site", [(c, LENGTH) for c in ("a", "b", "c", "z") * 5])  # 'z': not one of the federation's
    request = _request(tmp_path, spec, server)
    request = RoundRequest(**{**request.__dict__, "run_config": {**request.run_config, "lenient": True}})
    with pytest.raises(io.SiteRoundFailed):  # the server's lenient=true is not taken: a label it lacks fails the round
        run_round(request)
    assert PrivacyLedger.read(tmp_path / "state" / "ledger.sqlite").entries() == []
    own = RoundRequest(**{**request.__dict__, "node_config": {**request.node_config, protocol.NODE_LENIENT: True}})
    response = run_round(own)  # the site's own choice: its 'z' records are skipped (and counted in its log)
    assert response.refused is None and len(PrivacyLedger.read(tmp_path / "state" / "ledger.sqlite").entries()) == 1


def test_a_deployed_site_without_its_own_data_reads_no_file_the_server_names(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]]) -> None:
    """Review of 3 Dec: a site file without `data` made the site train on whatever manifest the server's run config named
    on the site's machine (another project's, say), and the kind of failure told whether a file exists there."""
    spec = _manifest(tmp_path, "elsewhere", [(c, LENGTH) for c in ("a", "b", "c")] * 4)
    request = _request(tmp_path, spec, server)
    node = {k: v for k, v in request.node_config.items() if k not in (protocol.NODE_DATA, protocol.NODE_LENIENT)}
    for data in (spec, "manifest:/etc/hostname", "basicmotions:/srv/other"):
        with pytest.raises(ConfigError, match=r"node-config data': is not set.*names files on this machine.*nothing was read or spent"):
            run_round(RoundRequest(**{**request.__dict__, "node_config": node, "run_config": {**request.run_config, "data": data}}))
    assert PrivacyLedger.read(tmp_path / "state" / "ledger.sqlite").entries() == []


def test_a_noise_share_the_rounds_range_would_truncate_is_refused_before_any_spend(tmp_path: Path) -> None:
    """Review of 3 Dec: under distributed client-level noise, a SecAgg+ clip range too small for the site's noise share
    was found only after the site had trained and recorded the round's spend, then sent nothing."""
    import torch

    from fedmm.models import layout_fingerprint
    from fedmm.secure.params import SecAggParams

    server = _server_side(tmp_path / "server", **{"sites": 3, "secure-aggregation": True, "client-dp": True, "client-noise": "distributed"})
    weights = server[2]
    request = _request(tmp_path, _manifest(tmp_path, "site", [(c, LENGTH) for c in CLASSES * 8]), server)
    request.config[protocol.LAYOUT] = layout_fingerprint({k: torch.from_numpy(v) for k, v in weights.items()})
    request.secagg = SecAggParams(clip_range=2.0, max_weight=1.0, target_range=1 << 22, threshold=2)
    with pytest.raises(PrivacyError, match="would truncate the site's noise share"):
        run_round(request)
    assert PrivacyLedger.read(tmp_path / "state" / "ledger.sqlite").entries() == []  # nothing spent


def test_a_plan_that_cannot_meet_target_epsilon_is_a_refusal_in_the_shared_words(tmp_path: Path, server: tuple[dict[str, object], str, dict[str, np.ndarray]]) -> None:
    """Review of 3 Dec: site-stats-noise=0.6 (its release alone over target-epsilon 8) reached the server as "failed at the
    site (PrivacyError)", though the cause is the server's settings; whether it fails depends on the site's sample rate,
    so it is told in the words every limit shares."""
    spec = _manifest(tmp_path, "site", [(c, LENGTH) for c in CLASSES * 8])
    response = run_round(_request(tmp_path, spec, server, **{"sensor-norm": "site", "site-stats-noise": 0.6}))
    assert response.refused is not None and "this round would break one of its limits (this run's target-epsilon=8" in response.refused
    assert "0.6" not in response.refused.replace("target-epsilon=8", "") and PrivacyLedger.read(tmp_path / "state" / "ledger.sqlite").entries() == []
