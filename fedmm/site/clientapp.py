"""Flower ClientApp: one data site. Loads its own data, enforces its budget, trains, replies.

Thin on purpose, and light to import: Flower and fedmm's wire names only; the round itself
is :func:`fedmm.site.runner.run_round`, imported when the first training message arrives. A
SecAgg+ round arrives as four messages; Flower's ``secaggplus_mod`` handles the protocol's
stages, none of which needs more than Flower, and calls :func:`_secure_fit` for the
training one.

It lives in the library, not in the app bundle (FAB) the server submits: ``clients/app.py``,
which the bundle carries for ``flwr run``, only imports it. A deployed site's executor
(:mod:`fedmm.runtime.executor`, started by ``fedmm site``) runs this one, the site's own
installed code, and never code from a server's bundle: a server cannot ship a ClientApp that
skips the site's policy or ledger. PyTorch and the site's data stay loaded between rounds.
"""

from __future__ import annotations

import logging
import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from fedmm import protocol
from fedmm.secure.params import SecAggParams
from fedmm.site.io import RoundRequest

# Opacus' import calls logging.basicConfig (a root handler): Flower's logger, which has its own handler,
# would print every line twice (and `flwr log` show it twice). Keep Flower's lines to Flower's handler.
logging.getLogger("flwr").propagate = False
_log = logging.getLogger("fedmm.site")
app = ClientApp()


def _run(context: Context, config: dict[str, Any], global_weights: dict[str, np.ndarray], secagg: Any = None) -> Any:
    """The site's round (:func:`fedmm.site.runner.run_round`), with the node's saved plan."""
    from fedmm.site.runner import run_round

    saved = context.state.config_records.get(protocol.STATE_KEY)
    response = run_round(RoundRequest(
        run_config=dict(context.run_config), node_config=dict(context.node_config), config=config,
        global_weights=global_weights, saved_state=str(saved["json"]) if saved else None, secagg=secagg, node_id=context.node_id,
    ))
    if response.state is not None:
        # The Flower node's copy of the plan; the spend itself is already in the site's ledger.
        context.state.config_records[protocol.STATE_KEY] = ConfigRecord({"json": response.state})
    return response


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this site's data and reply with the update, its size, loss and privacy report."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, _secure_fit)  # a stage of a SecAgg+ round
    config = dict(msg.content.config_records[protocol.CONFIG])
    global_weights = {k: v.numpy() for k, v in msg.content.array_records[protocol.ARRAYS].items()}
    response = _run(context, config, global_weights)
    if response.refused is not None:
        reply = ConfigRecord({protocol.SITE: response.site, protocol.REASON: response.refused, protocol.EPSILON: response.spent, protocol.BUDGET: response.budget, protocol.PROOF: response.proof})
        return Message(content=RecordDict({protocol.REFUSED: reply}), reply_to=msg)
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in response.arrays.items()}),
            protocol.METRICS: MetricRecord(response.metrics),
            protocol.MODEL: ConfigRecord({protocol.LAYOUT: response.layout}),
        }
    )
    if response.privacy:  # with the site's signed claim to its name (a deployment's; empty in simulation)
        content[protocol.PRIVACY] = ConfigRecord({**response.privacy, protocol.PROOF: response.proof})
    return Message(content=content, reply_to=msg)


def fit_metrics(response: Any) -> dict[str, Any]:
    """The plain metrics of a SecAgg+ reply. How many of its values the site clipped to the quantisation range stays
    in the site's log: a count per site, outside the masked sum, would tell the server about one site's update (with a
    clip range of its choosing, how the values spread), which secure aggregation is there to hide."""
    if response.clipped_values:
        _log.warning("[fedmm] site %s: %d update value(s) clipped to SecAgg+'s quantisation range (secagg-clip-range); the count is not sent",
                     response.site, response.clipped_values)
    if response.refused is not None:
        metrics: dict[str, Any] = {protocol.SITE: response.site, protocol.REASON: response.refused, protocol.EPSILON: response.spent, protocol.BUDGET: response.budget}
    else:
        metrics = {**response.metrics, protocol.LAYOUT: response.layout, **response.privacy}
    metrics[protocol.PROOF] = response.proof
    return metrics


def _secure_fit(msg: Message, context: Context) -> Message:
    """The training stage of a SecAgg+ round: reply with the update Flower's mod will mask."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fitins.config[protocol.TENSOR_NAMES]))
    tensors = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(tensors):
        raise ValueError(f"the server sent {len(tensors)} tensors named {len(names)} ways; is it fedmm's ServerApp?")
    params = SecAggParams.from_state(context.state.config_records.get(RECORD_KEY_STATE))
    response = _run(context, dict(fitins.config), dict(zip(names, tensors)), secagg=params)
    metrics = fit_metrics(response)
    reply = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(response.arrays.values())), num_examples=response.weight, metrics=metrics)
    return Message(compat.fitres_to_recorddict(reply, keep_input=False), reply_to=msg)
