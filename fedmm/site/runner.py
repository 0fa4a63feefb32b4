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
from typing import Any

import numpy as np
import torch

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.errors import BudgetExceededError, ConfigError, DataError, FederationError, PrivacyError
from fedmm.models import layout_fingerprint
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ledger import PrivacyLedger
from fedmm.privacy.policy import site_policy
from fedmm.secure.identity import sign_claim
from fedmm.secure.update import prepare_update
from fedmm.site.io import RoundRequest, RoundResponse
from fedmm.plan import RunPlan
from fedmm.site.data import site_data
from fedmm.site.round import SiteState, train_round

_log = logging.getLogger("fedmm.site")

__all__ = ["run_round", "without_paths"]


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


def _data(node_config: dict[str, Any], cfg: RunConfig) -> tuple[str, Any]:
    key = json.dumps([node_config, cfg.to_run_config()], sort_keys=True, default=str)
    if key not in _DATA:
        _DATA.clear()  # one configuration at a time
        _DATA[key] = site_data(node_config, cfg)
    return _DATA[key]


def _for_server(message: str, ledger_path: Any, node_config: Any) -> str:
    """What the server is told: without the site's local paths, except from a simulated site (``partition-id``),
    whose folders are the simulating user's own and whose paths are the fix they need."""
    return message if protocol.NODE_PARTITION_ID in node_config else without_paths(message, ledger_path)


def run_round(req: RoundRequest) -> RoundResponse:
    """Train this site for the round ``req.config`` describes; the site's own policy and ledger decide."""
    torch.set_num_threads(1)
    cfg = RunPlan.from_run_config(req.run_config).config  # every part checked, before any data is read
    try:
        site, data = _data(req.node_config, cfg)
    except DataError as err:
        # The site's own log keeps the local detail (paths, values); the error that reaches the server does not.
        _log.error("[fedmm] site data: %s", err.local_message)
        raise
    state = SiteState.from_json(req.saved_state) if req.saved_state else SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
    server_round = req.config.get(protocol.SERVER_ROUND)
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ConfigError(protocol.SERVER_ROUND, "the server sent no integer round number", value=server_round, fix="use fedmm's ServerApp")
    schema = req.config.get(protocol.SCHEMA)
    run_id = str(req.config.get(protocol.RUN_ID, "run"))
    # The site's own limits (its node config in a deployment) and its durable ledger.
    policy = site_policy(req.node_config, cfg, site=site, run_id=run_id)
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
        raise PrivacyError(_for_server(str(err), policy.ledger_path, req.node_config)) from None
    try:
        update = train_round(
            cfg=cfg, site=site, data=data, global_weights=global_t, server_round=server_round, state=state,
            expected_schema=str(schema) if schema is not None else None, policy=policy, ledger=ledger, run_id=run_id,
        )
    except BudgetExceededError as refusal:
        # A refusal is the site's answer, not a failure: no update, the reason, and its budget.
        entries = ledger.entries() if ledger is not None else []
        spent = entries[-1].epsilon if entries else 0.0
        _log.warning("[fedmm] site %s refuses round %d (epsilon spent %.3f of its budget %g): %s", site, server_round, spent, policy.epsilon_budget, refusal)
        reason = _for_server(str(refusal), policy.ledger_path, req.node_config)
        response = RoundResponse(site=site, refused=reason, spent=spent, budget=policy.epsilon_budget, proof=proof)
        if req.secagg is not None:
            # Inside SecAgg+: a zero update. Weight 0 takes no part in FedAvg; under client-level
            # DP (weights of 1) it still carries its noise share, so the noise never falls short.
            out = prepare_update(global_t, req.global_weights, cfg, weight=1 if cfg.client_dp else 0, secagg=req.secagg, site=site)
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
        out = prepare_update(update.state_dict, req.global_weights, cfg, weight=weight, secagg=req.secagg, site=site)
        response.arrays, response.weight, response.clipped_values = out.arrays, int(out.weight), out.clipped_values
    else:
        response.arrays, response.weight = {k: v.numpy() for k, v in update.state_dict.items()}, weight
    report, entry = update.privacy, update.ledger_entry
    if report is not None:
        left = f", {policy.epsilon_budget - report.epsilon:.3f} left of its budget {policy.epsilon_budget:g}"
        _log.info("[fedmm] site %s round %d: trained, epsilon %.3f (delta=%g, %s)%s, ledger entry %s", site, server_round,
                  report.epsilon, report.delta, report.accountant, left, entry.seq if entry is not None else "-")
    else:
        _log.info("[fedmm] site %s round %d: trained without DP (%d records)", site, server_round, update.num_examples)
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
