"""One site's round as plain data in and out: what the ClientApp runs.

The ClientApp turns a Flower message into a :class:`RoundRequest` and the
:class:`RoundResponse` back into a reply. Everything in between (the site's own policy
and ledger, training, what leaves the site) is here. A long-lived process (a simulation
worker, or a deployed site's executor, :mod:`fedmm.runtime.executor`) keeps the site's data
loaded between rounds.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.data.schema import Schema
from fedmm.errors import ConfigError, DataError, FederationError, FedMMError, PrivacyError, SiteRefused
from fedmm.models import layout_fingerprint
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ledger import PrivacyLedger
from fedmm.privacy.policy import site_policy
from fedmm.secure.identity import sign_claim
from fedmm.secure.update import check_noise_share, prepare_update
from fedmm.site.io import RoundRequest, RoundResponse, SiteRoundFailed
from fedmm.plan import RunPlan
from fedmm.site.data import check_own_data, site_data
from fedmm.site.round import SiteState, train_round

_log = logging.getLogger("fedmm.site")

__all__ = ["run_round", "without_paths", "SiteRoundFailed"]


def without_paths(message: str, ledger_path: Any) -> str:
    """``message`` with the site's local paths (its ledger, state folder, home) replaced by what they are.

    >>> without_paths("no privacy ledger at /srv/a/ledger.sqlite. Fix: ...", "/srv/a/ledger.sqlite")
    "no privacy ledger at <the site's ledger>. Fix: ..."
    """
    from pathlib import Path

    ledger = Path(str(ledger_path))
    for path, name in ((ledger.resolve(), "<the site's ledger>"), (ledger, "<the site's ledger>"),
                       (ledger.resolve().parent, "<the site's state folder>"), (ledger.parent, "<the site's state folder>"),
                       (Path.home(), "~")):
        if str(path) not in ("", ".", "/"):
            message = message.replace(str(path), name)
    return message


_DATA: dict[str, tuple[str, Any]] = {}  # a long-lived process keeps each site's data between rounds


def _data(node_config: dict[str, Any], cfg: RunConfig, server: Schema | None = None) -> tuple[str, Any]:
    key = json.dumps([node_config, cfg.to_run_config(), server.to_json() if server is not None else None], sort_keys=True, default=str)
    if key not in _DATA:
        _DATA.clear()  # one configuration at a time
        _DATA[key] = site_data(node_config, cfg, server=server)
    return _DATA[key]


def _for_server(message: str, ledger_path: Any, node_config: Any) -> str:
    """What the server is told: without the site's local paths, except from a simulated site (``partition-id``),
    whose folders are the simulating user's own and whose paths are the fix they need."""
    return message if protocol.NODE_PARTITION_ID in node_config else without_paths(message, ledger_path)


def _failed(err: BaseException, site: str | None, server_round: object, node_config: Any) -> SiteRoundFailed:
    """The error the server gets for a round that failed at the site: its kind only. The whole of it goes to the site's log.

    Whatever fails while the site loads its data, fits it to the server's model input, trains
    or prepares its update may describe the records (a class list, a series length, counts, a
    row), and whether it fails at all may hang on one record: neither is covered by DP.

    A simulated site (``partition-id``) also attaches the whole error as a note, which a
    traceback prints and ``str()`` leaves out: Flower's engine logs the traceback to the
    run's ``flower.log``, whose tail ``fedmm simulate`` prints. With ``--ray`` Ray's error
    text includes that traceback, note and all: a simulation's server is the same person as
    its sites. A deployed site attaches no note.
    """
    detail = err.local_message if isinstance(err, DataError) else str(err)
    unexpected = not isinstance(err, FedMMError)  # a bug or a library's error: the traceback helps the operator
    _log.error("[fedmm] site %s: round %s failed: %s: %s", site or "?", server_round, type(err).__name__, detail, exc_info=err if unexpected else None)
    failure = SiteRoundFailed(site, server_round, type(err).__name__, detail=detail)
    if protocol.NODE_PARTITION_ID in node_config:
        failure.add_note(f"at the site: {type(err).__name__}: {detail}")
    return failure


def _server_schema(config: dict[str, Any]) -> Schema:
    """The model input the server sent (a malformed or missing one is the server's error, and says so).

    Never made up from the site's own records: a model built from them (its classes, its series
    length) would fit the global weights at some sites and not at others, so whether a round
    fails would tell a server that left the schema out what the site holds.
    """
    text = config.get(protocol.SCHEMA)
    if text is None:
        raise ConfigError(protocol.SCHEMA, "the server sent no model input (its classes, modalities and shapes), which every round "
                          "needs; the site does not make one up from its own records, and nothing was read or spent",
                          fix="use fedmm's ServerApp, the same version at every site")
    try:
        return Schema.from_json(str(text))
    except (ValueError, KeyError, TypeError) as err:
        raise FederationError(f"the server sent a model input schema this site cannot read ({type(err).__name__}). Fix: use fedmm's ServerApp, the same version at every site") from None


class _Forward(Exception):
    """Carries an error the server may read as it is (about its request, or the site's ledger) past the sanitising."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def run_round(req: RoundRequest) -> RoundResponse:
    """Train this site for the round ``req.config`` describes; the site's own policy and ledger decide.

    Errors about the server's request (its run config, round, schema, SecAgg+ range) and
    about the site's ledger keep their text (a deployed site's paths replaced); a refusal
    is an answer with its reason. Any other failure, which may hang on the site's records,
    reaches the server as :class:`SiteRoundFailed` (its kind only), and the site's log has
    the whole error.
    """
    torch.set_num_threads(1)
    cfg = RunPlan.from_run_config(req.run_config).config  # every part checked, before any data is read
    server_round = req.config.get(protocol.SERVER_ROUND)
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ConfigError(protocol.SERVER_ROUND, "the server sent no integer round number", value=server_round, fix="use fedmm's ServerApp")
    server_schema = _server_schema(req.config)
    check_own_data(req.node_config, cfg)  # about the server's request and the site's settings: the server may read it
    # A deployed site's name as its operator set it (without one its name is its data's spec, a local path).
    named = str(req.node_config[protocol.NODE_SITE]) if protocol.NODE_SITE in req.node_config else None
    try:
        site, data = _data(req.node_config, cfg, server_schema)
    except Exception as err:  # noqa: BLE001 - whatever the site's data did, the server learns only that it failed
        raise _failed(err, named, server_round, req.node_config) from None
    try:
        return _train(req, cfg, site, data, server_round, server_schema)
    except _Forward as forward:
        raise forward.error from None
    except Exception as err:  # noqa: BLE001 - as above
        raise _failed(err, named if protocol.NODE_DATA in req.node_config else site, server_round, req.node_config) from None


def _prepare(local: Any, global_weights: Any, cfg: RunConfig, **kwargs: Any) -> Any:
    """:func:`prepare_update`; its PrivacyError (this round's SecAgg+ range would truncate the noise share) is about
    the server's settings, not the records, and the server may read it. Its other errors may describe the update."""
    try:
        return prepare_update(local, global_weights, cfg, **kwargs)
    except PrivacyError as err:
        raise _Forward(err) from None


def _refuse_another_sites_key(config: dict[str, Any], site: str) -> None:
    """Refuse, before any spend, a round whose server says this node's key is enrolled as another site: the update
    would be rejected (its proof names this site) after the site had spent on it. A server that lies here only
    makes the site refuse."""
    enrolled = config.get(protocol.ENROLLED)
    if enrolled is not None and str(enrolled) != site:
        fix = (f"Fix: give site {site} its own key (`fedmm certs site PKI {site}`, registered with `flwr supernode register`), "
               "or its right name")
        raise SiteRefused(
            f"site {site}: this SuperNode's key is enrolled at the server as site {str(enrolled)!r}, not {site!r}; not training (nothing spent). {fix}",
            # the server's own string is not echoed: the site's paths in it would be masked, telling a prober which guess was right
            public=f"site {site}: this SuperNode's key is enrolled at the server as another site; not training (nothing spent). {fix}",
        )


def _train(req: RoundRequest, cfg: RunConfig, site: str, data: Any, server_round: int, server_schema: Schema | None) -> RoundResponse:
    """The round after the site's data is loaded: policy, ledger, training, the update."""
    state = SiteState.from_json(req.saved_state) if req.saved_state else SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
    run_id = str(req.config.get(protocol.RUN_ID, "run"))
    # The site's own limits (its node config in a deployment) and its durable ledger. Their errors are about the
    # site's settings or the server's run id, never its records: the server may read them.
    try:
        policy = site_policy(req.node_config, cfg, site=site, run_id=run_id)
    except ConfigError as err:
        raise _Forward(err) from None
    # A deployed site signs its claim to its name with its enrolled key; the server checks it (fedmm.secure.identity).
    key = req.node_config.get(protocol.NODE_KEY)
    proof = sign_claim(str(key), run_id=run_id, server_round=server_round, node=req.node_id, site=site) if key else ""
    global_t = {k: torch.from_numpy(np.array(v)) for k, v in req.global_weights.items()}
    # Locked for this process from the budget check through the append; a missing ledger is an error, not a fresh start.
    try:
        ledger = PrivacyLedger.open(policy.ledger_path, site=site, create_if_new=policy.fresh_state) if cfg.dp else None
    except PrivacyError as err:
        # The site's log keeps where its ledger lies; the server learns what is wrong, not the site's paths.
        _log.error("[fedmm] site %s cannot train round %d: %s", site, server_round, err)
        raise _Forward(PrivacyError(_for_server(str(err), policy.ledger_path, req.node_config))) from None
    try:
        _refuse_another_sites_key(req.config, site)
        try:  # the server's SecAgg+ setup must carry the site's noise share: known before training, so nothing is spent
            check_noise_share(cfg, req.secagg, site)
        except (PrivacyError, FederationError) as err:
            raise _Forward(err) from None
        started = time.monotonic()
        update = train_round(
            cfg=cfg, site=site, data=data, global_weights=global_t, server_round=server_round, state=state,
            expected_schema=server_schema.to_json() if server_schema is not None else None, policy=policy, ledger=ledger, run_id=run_id,
        )
    except SiteRefused as refusal:
        # A refusal is the site's answer, not a failure: no update, the reason, and its budget.
        entries = ledger.entries() if ledger is not None else []
        carried = ledger.carried if ledger is not None else None
        spent = (entries[-1].epsilon if entries else 0.0) + (carried.epsilon if carried is not None else 0.0)  # a lost ledger's spend counts
        _log.warning("[fedmm] site %s refuses round %d (epsilon spent %.3f of its budget %g): %s", site, server_round, spent, policy.epsilon_budget, refusal)
        reason = _for_server(refusal.public, policy.ledger_path, req.node_config)  # without figures that follow from the records
        response = RoundResponse(site=site, refused=reason, spent=spent, budget=policy.epsilon_budget, proof=proof)
        if req.secagg is not None:
            # Inside SecAgg+: a zero update. Weight 0 takes no part in FedAvg; under client-level
            # DP (weights of 1) it still carries its noise share, so the noise never falls short.
            out = _prepare(global_t, req.global_weights, cfg, weight=1 if cfg.client_dp else 0, secagg=req.secagg, site=site)
            response.arrays, response.weight = out.arrays, int(out.weight)
        return response
    finally:
        if ledger is not None:
            ledger.close()
    layout = layout_fingerprint(update.state_dict)
    if req.secagg is not None and layout != req.config.get(protocol.LAYOUT):
        # Checked before masking: once inside the sum a mismatched update cannot be taken out.
        raise FederationError(
            f"site {site}: trained model layout {layout!r}, the server's is {req.config.get(protocol.LAYOUT)!r}; not sending. "
            "Fix: run the same fedmm version and model, data modalities and preprocessing keys at every site"
        )
    response = RoundResponse(site=site, layout=layout, state=state.to_json(), budget=policy.epsilon_budget, proof=proof)
    # Under DP nothing derived from the records leaves the site outside DP-SGD's guarantee: not the exact
    # number of records (FedAvg weighs every site equally instead, the weight agreed in advance) and not
    # the un-noised training loss. Without DP both are sent (no guarantee is claimed then).
    weight = 1 if cfg.dp else update.num_examples
    if cfg.sends_deltas:  # the update (clipped under client-level DP), not the weights
        out = _prepare(update.state_dict, req.global_weights, cfg, weight=weight, secagg=req.secagg, site=site)
        response.arrays, response.weight, response.clipped_values = out.arrays, int(out.weight), out.clipped_values
    else:
        response.arrays, response.weight = {k: v.numpy() for k, v in update.state_dict.items()}, weight
    report, entry = update.privacy, update.ledger_entry
    if report is not None:
        left = f", {policy.epsilon_budget - report.epsilon:.3f} left of its budget {policy.epsilon_budget:g}"
        _log.info("[fedmm] site %s round %d: trained in %.1f s, epsilon %.3f (delta=%g, %s)%s, ledger entry %s", site, server_round,
                  time.monotonic() - started, report.epsilon, report.delta, report.accountant, left, entry.seq if entry is not None else "-")
    else:
        _log.info("[fedmm] site %s round %d: trained without DP in %.1f s (%d records)", site, server_round, time.monotonic() - started, update.num_examples)
    response.metrics = {
        protocol.NUM_EXAMPLES: weight, **({} if cfg.dp else {protocol.TRAIN_LOSS: update.train_loss}),
        protocol.EPSILON: report.epsilon if report else 0.0,
    }
    if report is not None:
        response.privacy = {
            protocol.SITE: site, protocol.EPSILON: report.epsilon, protocol.DELTA: report.delta,
            protocol.ACCOUNTANT: report.accountant, protocol.NOISE_MULTIPLIER: report.noise_multiplier,
            protocol.SAMPLE_RATE: report.sample_rate, protocol.STEPS: report.steps,
        }
        if entry is not None:
            response.privacy.update({protocol.BUDGET: entry.epsilon_budget, protocol.LEDGER_SEQ: entry.seq, protocol.LEDGER_HASH: entry.hash})
    return response
