"""Flower ClientApp: one data site. Loads its own data, enforces its budget, trains, replies.

Thin on purpose: the round itself is :func:`fedmm.site.train_round`, and what leaves the
site under secure aggregation or client-level DP is :func:`fedmm.secure.update.prepare_update`.
A SecAgg+ round arrives as four messages; Flower's ``secaggplus_mod`` handles the
protocol's stages and calls :func:`_secure_fit` for the training one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.errors import BudgetExceededError, ConfigError, FederationError
from fedmm.models import layout_fingerprint
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ledger import PrivacyLedger
from fedmm.privacy.policy import SitePolicy, site_policy
from fedmm.secure.secagg import secagg_params, secure_fit_reply
from fedmm.secure.update import SecAggParams, prepare_update
from fedmm.site import SiteState, SiteUpdate, site_data, train_round

app = ClientApp()


@dataclass
class _Outcome:
    """A site's round: its update, or its refusal (the reason and what it has spent)."""

    site: str
    policy: SitePolicy
    update: SiteUpdate | None = None
    refusal: str | None = None
    spent: float = 0.0


def _site_round(config: Mapping[str, object], global_weights: Mapping[str, torch.Tensor], context: Context, cfg: RunConfig) -> _Outcome:
    """Train this site for the round ``config`` describes; the site's own policy and ledger decide."""
    torch.set_num_threads(1)
    site, data = site_data(context.node_config, cfg)
    saved = context.state.config_records.get(protocol.STATE_KEY)
    state = SiteState.from_json(str(saved["json"])) if saved else SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
    server_round = config.get(protocol.SERVER_ROUND)
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ConfigError(protocol.SERVER_ROUND, "the server sent no integer round number", value=server_round, fix="use fedmm's ServerApp")
    schema = config.get(protocol.SCHEMA)
    run_id = str(config.get(protocol.RUN_ID, context.run_id))
    # The site's own limits (its node config in a deployment) and its durable ledger.
    policy = site_policy(context.node_config, cfg, site=site, run_id=run_id)
    ledger = PrivacyLedger(policy.ledger_path, site=site) if cfg.dp else None
    try:
        update = train_round(
            cfg=cfg, site=site, data=data, global_weights=global_weights, server_round=server_round, state=state,
            expected_schema=str(schema) if schema is not None else None, policy=policy, ledger=ledger, run_id=run_id,
        )
    except BudgetExceededError as refusal:
        # A refusal is the site's answer, not a failure: no update, the reason, and its budget.
        entries = ledger.entries() if ledger is not None else []
        return _Outcome(site, policy, refusal=str(refusal), spent=entries[-1].epsilon if entries else 0.0)
    finally:
        if ledger is not None:
            ledger.close()
    # The Flower node's copy of the plan; the spend itself is already in the ledger.
    context.state.config_records[protocol.STATE_KEY] = ConfigRecord({"json": state.to_json()})
    return _Outcome(site, policy, update=update)


def _privacy_fields(outcome: _Outcome) -> dict[str, Any]:
    update = outcome.update
    assert update is not None
    report, entry = update.privacy, update.ledger_entry
    if report is None:
        return {}
    fields: dict[str, Any] = {
        protocol.SITE: outcome.site, protocol.EPSILON: report.epsilon, protocol.DELTA: report.delta,
        protocol.ACCOUNTANT: report.accountant, protocol.NOISE_MULTIPLIER: report.noise_multiplier,
        protocol.SAMPLE_RATE: report.sample_rate, protocol.STEPS: report.steps,
    }
    if entry is not None:
        fields.update({protocol.BUDGET: entry.epsilon_budget, protocol.LEDGER_SEQ: entry.seq, protocol.LEDGER_HASH: entry.hash})
    return fields


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this site's data and reply with the update, its size, loss and privacy report."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, _secure_fit)  # a stage of a SecAgg+ round
    cfg = RunConfig.from_run_config(context.run_config)
    config = msg.content.config_records[protocol.CONFIG]
    global_weights = msg.content.array_records[protocol.ARRAYS].to_torch_state_dict()
    outcome = _site_round(config, global_weights, context, cfg)
    if outcome.update is None:
        reply = ConfigRecord({protocol.SITE: outcome.site, protocol.REASON: str(outcome.refusal), protocol.EPSILON: outcome.spent, protocol.BUDGET: outcome.policy.epsilon_budget})
        return Message(content=RecordDict({protocol.REFUSED: reply}), reply_to=msg)
    update = outcome.update
    if cfg.client_dp:  # the clipped update, not the weights (the server adds the noise)
        out = prepare_update(update.state_dict, {k: v.numpy() for k, v in global_weights.items()}, cfg, weight=update.num_examples, site=outcome.site)
        arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in out.arrays.items()})
    else:
        arrays = ArrayRecord(update.state_dict)
    content = RecordDict(
        {
            protocol.ARRAYS: arrays,
            protocol.METRICS: MetricRecord(
                {
                    protocol.NUM_EXAMPLES: update.num_examples,
                    protocol.TRAIN_LOSS: update.train_loss,
                    protocol.EPSILON: update.privacy.epsilon if update.privacy else 0.0,
                }
            ),
        }
    )
    content[protocol.MODEL] = ConfigRecord({protocol.LAYOUT: layout_fingerprint(update.state_dict)})
    privacy = _privacy_fields(outcome)
    if privacy:
        content[protocol.PRIVACY] = ConfigRecord(privacy)
    return Message(content=content, reply_to=msg)


def _secure_fit(msg: Message, context: Context) -> Message:
    """The training stage of a SecAgg+ round: reply with the update Flower's mod will mask."""
    cfg = RunConfig.from_run_config(context.run_config)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fitins.config[protocol.TENSOR_NAMES]))
    tensors = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(tensors):
        raise FederationError(f"the server sent {len(tensors)} tensors named {len(names)} ways; is it fedmm's ServerApp?")
    global_np = {name: np.asarray(t) for name, t in zip(names, tensors)}
    params: SecAggParams = secagg_params(context)
    outcome = _site_round(fitins.config, {k: torch.from_numpy(v.copy()) for k, v in global_np.items()}, context, cfg)
    if outcome.update is None:
        # Refusing inside SecAgg+: a zero update. Weight 0 takes no part in FedAvg; under
        # client-level DP (weights of 1) it still carries its noise share, so the noise in
        # the sum never falls below what the round was calibrated for.
        zero = {k: torch.from_numpy(v.copy()) for k, v in global_np.items()}
        out = prepare_update(zero, global_np, cfg, weight=1 if cfg.client_dp else 0, secagg=params, site=outcome.site)
        refusal: dict[str, Any] = {protocol.SITE: outcome.site, protocol.REASON: str(outcome.refusal), protocol.EPSILON: outcome.spent, protocol.BUDGET: outcome.policy.epsilon_budget}
        reply = secure_fit_reply(arrays=list(out.arrays.values()), weight=out.weight, metrics=refusal)
        return Message(compat.fitres_to_recorddict(reply, keep_input=False), reply_to=msg)
    update = outcome.update
    layout = layout_fingerprint(update.state_dict)
    if layout != fitins.config.get(protocol.LAYOUT):
        # Checked here, before masking: once inside the sum a mismatched update cannot be taken out.
        raise FederationError(
            f"site {outcome.site}: trained model layout {layout!r}, the server's is {fitins.config.get(protocol.LAYOUT)!r}; not sending. "
            "Fix: run the same fedmm version and model, data modalities and preprocessing keys at every site"
        )
    out = prepare_update(update.state_dict, global_np, cfg, weight=update.num_examples, secagg=params, site=outcome.site)
    metrics: dict[str, Any] = {
        protocol.NUM_EXAMPLES: update.num_examples, protocol.TRAIN_LOSS: update.train_loss, protocol.LAYOUT: layout,
        protocol.CLIPPED_VALUES: out.clipped_values, **_privacy_fields(outcome),
    }
    reply = secure_fit_reply(arrays=list(out.arrays.values()), weight=out.weight, metrics=metrics)
    return Message(compat.fitres_to_recorddict(reply, keep_input=False), reply_to=msg)
