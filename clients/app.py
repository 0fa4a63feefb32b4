"""Flower ClientApp: one data site. Loads its own data, enforces its budget, trains, replies.

Thin on purpose: the round itself is :func:`fedmm.site.train_round`.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.errors import ConfigError
from fedmm.models import layout_fingerprint
from fedmm.site import SiteState, site_data, train_round
from fedmm.privacy.accounting import SiteAccountant

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
    schema = msg.content.config_records[protocol.CONFIG].get(protocol.SCHEMA)
    update = train_round(
        cfg=cfg, site=site, data=data, global_weights=msg.content.array_records[protocol.ARRAYS].to_torch_state_dict(),
        server_round=server_round, state=state, expected_schema=str(schema) if schema is not None else None,
    )
    # The spend is stored before the update leaves the site.
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
            }
        )
    return Message(content=content, reply_to=msg)
