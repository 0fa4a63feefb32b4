"""Flower ClientApp: one data site. Loads its own data, enforces its budget, trains, replies.

Thin on purpose: the round itself is :func:`fedmm.site.train_round`.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.errors import BudgetExceededError, ConfigError
from fedmm.models import layout_fingerprint
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ledger import PrivacyLedger
from fedmm.privacy.policy import site_policy
from fedmm.site import SiteState, site_data, train_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this site's data and reply with the update, its size, loss and privacy report."""
    torch.set_num_threads(1)
    cfg = RunConfig.from_run_config(context.run_config)
    site, data = site_data(context.node_config, cfg)
    saved = context.state.config_records.get(protocol.STATE_KEY)
    state = SiteState.from_json(str(saved["json"])) if saved else SiteState(plan=None, accountant=SiteAccountant(cfg.accountant))
    server_round = msg.content.config_records[protocol.CONFIG].get(protocol.SERVER_ROUND)
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ConfigError(protocol.SERVER_ROUND, "the server sent no integer round number", value=server_round, fix="use fedmm's ServerApp")
    config = msg.content.config_records[protocol.CONFIG]
    schema = config.get(protocol.SCHEMA)
    run_id = str(config.get(protocol.RUN_ID, context.run_id))
    # The site's own limits (its node config in a deployment) and its durable ledger.
    policy = site_policy(context.node_config, cfg, site=site, run_id=run_id)
    ledger = PrivacyLedger(policy.ledger_path, site=site) if cfg.dp else None
    try:
        update = train_round(
            cfg=cfg, site=site, data=data, global_weights=msg.content.array_records[protocol.ARRAYS].to_torch_state_dict(),
            server_round=server_round, state=state, expected_schema=str(schema) if schema is not None else None,
            policy=policy, ledger=ledger, run_id=run_id,
        )
    except BudgetExceededError as refusal:
        # A refusal is the site's answer, not a failure: no weights, the reason, and its budget.
        spent = ledger.entries()[-1].epsilon if ledger is not None and ledger.entries() else 0.0
        reply = ConfigRecord({protocol.SITE: site, protocol.REASON: str(refusal), protocol.EPSILON: spent, protocol.BUDGET: policy.epsilon_budget})
        return Message(content=RecordDict({protocol.REFUSED: reply}), reply_to=msg)
    finally:
        if ledger is not None:
            ledger.close()
    # The Flower node's copy of the plan; the spend itself is already in the ledger.
    context.state.config_records[protocol.STATE_KEY] = ConfigRecord({"json": state.to_json()})
    report = update.privacy
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(update.state_dict),
            protocol.METRICS: MetricRecord(
                {
                    protocol.NUM_EXAMPLES: update.num_examples,
                    protocol.TRAIN_LOSS: update.train_loss,
                    protocol.EPSILON: report.epsilon if report else 0.0,
                }
            ),
        }
    )
    content[protocol.MODEL] = ConfigRecord({protocol.LAYOUT: layout_fingerprint(update.state_dict)})
    if report is not None:
        content[protocol.PRIVACY] = ConfigRecord(
            {
                protocol.SITE: site, protocol.EPSILON: report.epsilon, protocol.DELTA: report.delta,
                protocol.ACCOUNTANT: report.accountant, protocol.NOISE_MULTIPLIER: report.noise_multiplier,
                protocol.SAMPLE_RATE: report.sample_rate, protocol.STEPS: report.steps,
                **(
                    {protocol.BUDGET: update.ledger_entry.epsilon_budget, protocol.LEDGER_SEQ: update.ledger_entry.seq, protocol.LEDGER_HASH: update.ledger_entry.hash}
                    if update.ledger_entry is not None else {}
                ),
            }
        )
    return Message(content=content, reply_to=msg)
