"""SecAgg+ round time against plain FedAvg, side by side, for 10/50/100 sites and 100k/1M parameters.

Both sides run the same Flower legacy workflow, the same FedAvg strategy and the same
site function (which returns a fixed random update instead of training); the SecAgg+
side adds Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` exactly as fedmm uses
them. Sites run in this process (:class:`fedmm.runtime.local.LocalGrid`), one after the
other, so the script reports three figures per setting:

- ``serial``: wall time of one round, every site's work done in turn on this machine;
- ``server``: the server's share of it (everything but the sites' own calls);
- ``deployed~``: server + the slowest single site's total, what a round costs when the
  sites are separate machines working in parallel (network time not included).

Each ratio is SecAgg+ over plain FedAvg; times are medians of ``--repeats`` rounds.
SecAgg+ shares each site's keys with ``k = 2*ceil(log2 n) + 1`` neighbours (at most
n), threshold ``ceil(2k/3)``: the logarithmic neighbourhood of Bell et al. (CCS 2020).

    python benchmarks/secagg_overhead.py [--sites 10 50 100] [--params 100000 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
import logging  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server import LegacyContext, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow  # noqa: E402

from fedmm.runtime.local import LocalGrid  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _client_app(params: int, secure: bool) -> ClientApp:
    app = ClientApp()
    rng = np.random.default_rng(0)
    update = [rng.normal(0, 0.01, params // 4).astype(np.float32) for _ in range(4)]  # four tensors

    def fit(msg: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        new = [g + u for g, u in zip(parameters_to_ndarrays(fitins.parameters), update)]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(new), num_examples=100, metrics={})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return secaggplus_mod(msg, context, fit) if secure else fit(msg, context)

    return app


class _TimedGrid(LocalGrid):
    """LocalGrid that records each site's own time per node."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.per_node: dict[int, float] = {}

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for message in messages:
            start = time.perf_counter()
            ids.extend(super().push_messages([message]))
            node = message.metadata.dst_node_id
            self.per_node[node] = self.per_node.get(node, 0.0) + time.perf_counter() - start
        return ids


def one_round(sites: int, params: int, secure: bool) -> dict[str, float]:
    grid = _TimedGrid(_client_app(params, secure), [{}] * sites, {})
    initial = ndarrays_to_parameters([np.zeros(params // 4, np.float32) for _ in range(4)])
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sites, min_available_clients=sites, initial_parameters=initial)
    context = LegacyContext(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), config=ServerConfig(num_rounds=1), strategy=strategy)
    if secure:
        k = min(sites, 2 * math.ceil(math.log2(sites)) + 1)
        fit_workflow = SecAggPlusWorkflow(num_shares=k if k < sites else 1.0, reconstruction_threshold=math.ceil(2 * k / 3))
        workflow = DefaultWorkflow(fit_workflow=fit_workflow)
    else:
        workflow = DefaultWorkflow()
    start = time.perf_counter()
    workflow(grid, context)
    total = time.perf_counter() - start
    clients = sum(grid.per_node.values())
    return {"serial": total, "server": total - clients, "deployed": total - clients + max(grid.per_node.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    rows = []
    print(f"{'sites':>5} {'params':>9} | {'plain s':>8} {'secagg s':>9} {'serial x':>8} {'+s':>6} | {'server x':>8} | {'deployed~ s':>11} {'x':>6}")
    for params in args.params:
        for sites in args.sites:
            plain, secure = [], []
            for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
                plain.append(one_round(sites, params, secure=False))
                secure.append(one_round(sites, params, secure=True))
            med = {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in (("plain", plain), ("secagg", secure))}
            row = {
                "sites": sites, "params": params, "repeats": args.repeats, **{f"{side}_{k}": v for side, m in med.items() for k, v in m.items()},
                "serial_ratio": med["secagg"]["serial"] / med["plain"]["serial"],
                "server_ratio": med["secagg"]["server"] / med["plain"]["server"],
                "deployed_ratio": med["secagg"]["deployed"] / med["plain"]["deployed"],
            }
            rows.append(row)
            print(
                f"{sites:>5} {params:>9} | {med['plain']['serial']:>8.2f} {med['secagg']['serial']:>9.2f} {row['serial_ratio']:>7.1f}x "
                f"{med['secagg']['serial'] - med['plain']['serial']:>6.2f} | "
                f"{row['server_ratio']:>7.1f}x | {med['secagg']['deployed']:>11.2f} {row['deployed_ratio']:>5.1f}x",
                flush=True,
            )
    # How the SecAgg+ round grows with the number of sites: the exponent b in time ~ sites^b.
    for params in args.params:
        mine = sorted((r["sites"], r["secagg_deployed"], r["secagg_serial"]) for r in rows if r["params"] == params)
        for (n0, d0, s0), (n1, d1, s1) in zip(mine, mine[1:]):
            print(
                f"{params} params, {n0} -> {n1} sites: deployed~ x{d1 / d0:.1f} (sites^{math.log(d1 / d0) / math.log(n1 / n0):.2f}), "
                f"serial x{s1 / s0:.1f} (sites^{math.log(s1 / s0) / math.log(n1 / n0):.2f})"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secagg_overhead.json").write_text(json.dumps(rows, indent=2))
    print(f"written {RESULTS / 'secagg_overhead.json'}")


if __name__ == "__main__":
    main()
