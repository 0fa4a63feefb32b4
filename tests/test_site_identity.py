"""The server's book believes no site (issue 17, findings 3 and 4): names, ledgers and epsilons are checked.

Each test replays what a dishonest site did against fedmm 0.1: it claimed another site's name
(with its own key, or as a second node), sent a ledger head or an epsilon that went back, or
reported an epsilon far below what its own mechanism gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmm import protocol
from fedmm.errors import FederationError
from fedmm.federation.book import FederationBook
from fedmm.privacy.accounting import SiteAccountant
from fedmm.config import AccountantKind
from fedmm.secure.certs import create_site_keys
from fedmm.secure.identity import EnrolledKeys, sign_claim

RUN = "study-1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    create_site_keys(root, ["george", "jackson"])
    return root


def _report(site: str, *, seq: int, steps: int, epsilon: float | None = None, proof: str = "") -> dict[str, object]:
    if epsilon is None:  # what the mechanism really gives
        accountant = SiteAccountant(AccountantKind.RDP)
        accountant.record(noise_multiplier=1.0, sample_rate=0.25, steps=steps)
        epsilon = accountant.epsilon(1e-5)
    return {
        protocol.SITE: site, protocol.EPSILON: epsilon, protocol.DELTA: 1e-5, protocol.ACCOUNTANT: "rdp",
        protocol.NOISE_MULTIPLIER: 1.0, protocol.SAMPLE_RATE: 0.25, protocol.STEPS: steps, protocol.LEDGER_SEQ: seq, protocol.PROOF: proof,
    }


def _book(keys: EnrolledKeys | None = None) -> FederationBook:
    book = FederationBook(dp=True)
    book.expect_identities(accountant="rdp", delta=1e-5, local_epochs=1, run_id=RUN, keys=keys)
    return book


def _keep(book: FederationBook, server_round: int, *reports: tuple[int, dict[str, object]]) -> dict[int, str]:
    refused: dict[int, str] = {}
    book.keep_reports(server_round, reports, on_refused=refused.__setitem__)
    return refused


def test_a_site_started_with_georges_key_cannot_be_counted_as_jackson(pki: Path) -> None:
    book = _book(EnrolledKeys.load(pki / "sites"))
    george_key = pki / "sites" / "george.key"
    honest = _report("george", seq=1, steps=4, proof=sign_claim(george_key, run_id=RUN, server_round=1, node=11, site="george"))
    borrowed = _report("jackson", seq=1, steps=4, proof=sign_claim(george_key, run_id=RUN, server_round=1, node=12, site="jackson"))
    replayed = _report("george", seq=2, steps=8, proof=honest[protocol.PROOF])  # last round's proof, replayed

    refused = _keep(book, 1, (11, honest), (12, borrowed))
    refused_later = _keep(book, 2, (11, replayed))

    assert set(refused) == {12} and "no valid proof made with jackson's enrolled key" in refused[12]
    assert "jackson" not in book.site_privacy and "george" in book.site_privacy
    assert set(refused_later) == {11}


def test_two_nodes_under_one_name_and_a_ledger_that_goes_back_are_refused() -> None:
    book = _book()

    first = _keep(book, 1, (1, _report("george", seq=5, steps=4)), (2, _report("george", seq=5, steps=4, epsilon=0.01)))
    again = _keep(book, 2, (1, _report("george", seq=4, steps=8)))

    assert "which node 1 holds in this run" in first[2]
    assert "reported ledger entry 4 after entry 5" in again[1]
    assert book.site_privacy["george"].ledger_seq == 5  # the earlier, higher head stays


def test_the_server_recomputes_each_sites_epsilon_and_keeps_the_larger() -> None:
    book = _book()
    truthful = _report("george", seq=1, steps=4)

    _keep(book, 1, (1, _report("george", seq=1, steps=4, epsilon=0.01)))  # a site that understates its spend

    kept = book.site_privacy["george"]
    assert kept.epsilon_site == 0.01 and kept.epsilon_server == pytest.approx(truthful[protocol.EPSILON])
    assert kept.epsilon == kept.epsilon_server and book.max_epsilon == pytest.approx(truthful[protocol.EPSILON])


def test_a_falling_epsilon_or_steps_the_plan_does_not_give_are_refused() -> None:
    book = _book()
    _keep(book, 1, (1, _report("george", seq=1, steps=4, epsilon=7.5)))

    falling = _keep(book, 2, (1, _report("george", seq=2, steps=8, epsilon=0.01)))
    skipped = _keep(book, 3, (1, _report("george", seq=2, steps=100, epsilon=9.0)))  # one entry, 96 steps: not one round

    assert "a spent epsilon never falls" in falling[1]
    assert "the plan gives 4 a round" in skipped[1]
    assert book.site_privacy["george"].epsilon == 7.5  # the lower report lowered nothing


def test_without_a_refusal_handler_a_lie_stops_the_run() -> None:
    """SecAgg+ cannot leave one masked vector out after the fact: a lie there stops the run."""
    book = _book()
    book.keep_reports(1, [(1, _report("george", seq=1, steps=4))])

    with pytest.raises(FederationError, match="which node 1 holds"):
        book.keep_reports(1, [(2, _report("george", seq=1, steps=4))])


def test_the_same_report_read_twice_is_not_a_lie() -> None:
    book = _book()
    report = _report("george", seq=1, steps=4)

    assert _keep(book, 1, (1, report)) == {} and _keep(book, 1, (1, report)) == {}


def test_a_malformed_or_weaker_report_is_refused_not_a_crash() -> None:
    """Review finding: noise 0 raised PrivacyError out of the loop, so later sites' reports went unrecorded."""
    book = _book()
    no_noise = {**_report("george", seq=1, steps=4), protocol.NOISE_MULTIPLIER: 0.0}
    weak_delta = {**_report("jackson", seq=1, steps=4), protocol.DELTA: 0.5}

    refused = _keep(book, 1, (1, no_noise), (2, weak_delta), (3, _report("lucas", seq=1, steps=4)))

    assert set(refused) == {1, 2} and "weaker than the run's target-delta" in refused[2]
    assert set(book.site_privacy) == {"lucas"}


def test_a_site_that_spent_in_another_federation_between_rounds_is_not_called_a_liar() -> None:
    book = _book()
    _keep(book, 1, (1, _report("george", seq=1, steps=4)))

    assert _keep(book, 2, (1, _report("george", seq=4, steps=4 + 4 + 30))) == {}  # two entries of another study in between


def test_a_report_sent_again_in_a_later_round_is_refused_and_the_site_not_asked_again() -> None:
    """Audit finding: an identical report was taken as 'read twice' in any round, so a site that trained every
    round while re-sending its round-1 report had its update aggregated and its epsilon stuck at one round."""
    book = _book()
    first = _report("george", seq=1, steps=4)
    assert _keep(book, 1, (1, first)) == {} and _keep(book, 1, (1, first)) == {}  # SecAgg+ reads it twice in its round

    replayed = _keep(book, 2, (1, first))

    assert "sent the privacy report of round 1 again in round 2" in replayed[1]
    assert 1 in book.refused_nodes  # its next round would be one more spend no report of it could vouch for
    assert book.site_privacy["george"].ledger_seq == 1


def test_under_secagg_one_refused_report_does_not_lose_the_honest_reports_after_it() -> None:
    """Audit finding: without a refusal handler the first lie raised at once; later sites' spends went unrecorded."""
    book = _book()
    book.keep_reports(1, [(1, _report("george", seq=1, steps=4)), (2, _report("jackson", seq=1, steps=4))])

    with pytest.raises(FederationError, match="which node 1 holds"):
        book.keep_reports(2, [(3, _report("george", seq=2, steps=8)), (2, _report("jackson", seq=2, steps=8))])

    assert book.site_privacy["jackson"].ledger_seq == 2 and 3 in book.refused_nodes


def test_the_servers_own_account_of_each_site_survives_a_checkpoint() -> None:
    """Audit finding: after a resume the server's accountant restarted from zero, so a site understating its
    epsilon was recorded at the figure of the rounds since the resume only."""
    book = _book()
    for r in (1, 2, 3):
        _keep(book, r, (1, _report("george", seq=r, steps=4 * r, epsilon=0.01)))
    state = book.to_state()

    resumed = _book()
    resumed.restore(state, rounds_done=3)
    refused = _keep(resumed, 4, (7, _report("george", seq=4, steps=16, epsilon=0.01)))  # a new node id after the restart

    assert refused == {}
    assert resumed.site_privacy["george"].epsilon_server == pytest.approx(_report("george", seq=4, steps=16)[protocol.EPSILON])
    assert "sent the privacy report" in _keep(resumed, 5, (7, _report("george", seq=4, steps=16, epsilon=0.01)))[7]


def test_client_level_rounds_before_a_resume_keep_the_noise_they_ran_with() -> None:
    """Audit finding: the checkpoint kept only the number of client-level DP rounds, replayed at the resumed
    run's noise: resuming with client-noise-multiplier 4 after 10 rounds at 0.8 cut their epsilon from 25.5 to ~2."""
    from fedmm.config import RunConfig
    from fedmm.privacy.client_dp import ClientDPPlan

    def book(sigma: float) -> FederationBook:
        return FederationBook(dp=False, client_dp=ClientDPPlan.from_config(RunConfig(client_dp=True, client_noise_multiplier=sigma, sites=3)))

    before = book(0.8)
    for _ in range(10):
        before.client_accountant.record_round()
    resumed = book(4.0)
    resumed.restore(before.to_state(), rounds_done=10)

    assert resumed.client_accountant.rounds == 10 and resumed.client_epsilon == pytest.approx(before.client_epsilon)
    resumed.client_accountant.record_round()  # the next round at the resumed run's own noise
    assert resumed.client_epsilon > before.client_epsilon
    assert resumed.client_accountant.history[-1].noise_multiplier == 4.0


def test_a_resume_with_other_settings_says_what_changed_and_keeps_both_configs(tmp_path: Path) -> None:
    """Audit finding: resume=true took any config silently and config.toml kept saying the first run's noise."""
    from fedmm.config import RunConfig
    from fedmm.federation.artifacts import RunArtifacts

    first = RunConfig(runs_dir=str(tmp_path), run_name="run", client_dp=True, client_noise_multiplier=0.8, sites=3)
    saved = RunArtifacts(first, "run")
    saved.save_config(first)
    saved.save_checkpoint(2, {"w": np.zeros(2, np.float32)}, {})
    saved.close()  # the run ends; then it is resumed
    resumed = first.replace(client_noise_multiplier=4.0, resume=True)
    artifacts = RunArtifacts(resumed, "run", resume=True)

    assert artifacts.record_resume(first.replace(resume=True), after_round=2) == []  # the same settings: nothing to say
    changed = artifacts.record_resume(resumed, after_round=2)

    assert changed == ["client-noise-multiplier: 0.8 -> 4.0"]
    assert "client-noise-multiplier = 0.8" in (tmp_path / "run" / "config.toml").read_text()
    assert "client-noise-multiplier = 4.0" in (tmp_path / "run" / "config-resumed-2.toml").read_text()


@pytest.mark.parametrize("secure", [False, True])
def test_a_site_whose_key_is_enrolled_as_another_site_refuses_before_it_spends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secure: bool) -> None:
    """Operator finding: a site started with another site's key trained and spent, then the server rejected its
    update (its proof named the site with a key enrolled for another). Now the server tells each node the site its
    registered key is enrolled as, and a site with another's key refuses the round with nothing spent."""
    import json

    import server.app as server_app
    from clients.app import app as client_app
    from flwr.app import Context, RecordDict

    from fedmm.config import RunConfig
    from fedmm.privacy.audit import audit_ledger
    from fedmm.runtime.local import LocalGrid

    cfg = RunConfig(data="synthetic:300", sites=3, rounds=2, min_sites=2, runs_dir=str(tmp_path), run_name="run", secure_aggregation=secure,
                    noise_multiplier=1.5, target_epsilon=50.0)
    enrolled = {101: "0", 102: "0", 103: "2"}  # node 102 runs site "1" with site 0's key
    monkeypatch.setattr(server_app, "enrolled_lookup", lambda keys: enrolled.get)
    run_config = cfg.to_run_config()
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)
    server_app.main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))

    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2
    sites = {s["site"]: s for s in json.loads((run / "privacy.json").read_text())["sites"]}
    assert "enrolled at the server as another site" in str(sites["1"]["refused"]), sites.get("1")
    assert audit_ledger(run / "sites" / "1" / "ledger.sqlite").entries == []  # nothing spent
    assert [e["round"] for e in audit_ledger(run / "sites" / "0" / "ledger.sqlite").entries] == [1, 2]
