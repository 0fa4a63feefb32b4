"""An in-process federation for comparing settings quickly: fedmm's own site rounds, no Flower.

Every round each site runs :func:`fedmm.site.round.train_round` on its data as a simulated
site sees it (DP-SGD and its accountant as in a real run), the server averages the updates
as FedAvg does (weights of 1 under DP, num-examples otherwise) and applies the run's server
optimizer; the served model is scored on the server's held-out set after the last round.
The same work as ``fedmm simulate`` without its processes: use it to compare settings, and
confirm a winner with real ``fedmm simulate`` runs.

    python benchmarks/inprocess.py --data basicmotions --set dp=false --set sensor-norm=window --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedmm.data.normalise import normalise  # noqa: E402
from fedmm.data.partition import build_federation  # noqa: E402
from fedmm.data.sources import load_source  # noqa: E402
from fedmm.federation.book import FederationBook  # noqa: E402
from fedmm.federation.server_opt import ServerOptimizer  # noqa: E402
from fedmm.models.evaluation import score  # noqa: E402
from fedmm.plan import RunPlan  # noqa: E402
from fedmm.privacy.accounting import SiteAccountant  # noqa: E402
from fedmm.site.round import SiteState, train_round  # noqa: E402


def federate(values: dict[str, Any], on_round: Callable[[int], None] | None = None) -> dict[str, float]:
    """Run one in-process federation of the run config ``values``; accuracy, macro-F1, max epsilon, seconds.

    ``client-fraction`` below 1 asks the sites the server would ask (:meth:`FederationBook.sample_nodes`,
    without client-level DP); ``on_round(r)`` is called after each round.
    """
    start = time.monotonic()
    plan = RunPlan.from_run_config(values)
    cfg = plan.config
    source = load_source(cfg.data, plan.preprocessing, classes=cfg.class_list, test_fraction=cfg.test_fraction)
    federation = build_federation(source, plan.federation)
    plan = plan.with_sites(len(federation.names))
    cfg = plan.config
    test_raw = normalise(source.require_test(), sensor_norm=cfg.sensor_norm, site_statistics=not cfg.dp, held_out=True)
    recipe = plan.model
    test = recipe.prepare(test_raw, tasks_from=recipe.task_classes(test_raw))
    model = recipe.build(test.schema, seed=cfg.seed)
    if cfg.learning_rate is None:
        cfg = cfg.replace(learning_rate=plan.learning_rate(test.schema))
    states = {name: SiteState(plan=None, accountant=SiteAccountant(cfg.accountant)) for name in federation.names}
    optimizer = ServerOptimizer.from_config(cfg)
    glob = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    epsilon = 0.0
    book = FederationBook(dp=cfg.dp, min_sites=cfg.min_sites, client_fraction=cfg.client_fraction, seed=cfg.seed)
    for server_round in range(1, cfg.rounds + 1):
        updates, weights = [], []
        asked = set(book.sample_nodes(server_round, range(len(federation.names))))
        for index, (name, data) in enumerate(zip(federation.names, federation.sites)):
            if index not in asked:
                continue
            out = train_round(cfg=cfg, site=name, data=data, global_weights={k: torch.from_numpy(v.copy()) for k, v in glob.items()},
                              server_round=server_round, state=states[name], expected_schema=test.schema.to_json())
            updates.append({k: v.numpy().astype(np.float64) for k, v in out.state_dict.items()})
            weights.append(1.0 if cfg.dp else float(out.num_examples))
            epsilon = max(epsilon, out.privacy.epsilon) if out.privacy is not None else epsilon
        total = sum(weights)
        mean = {k: (sum(w * u[k] for w, u in zip(weights, updates)) / total).astype(glob[k].dtype) for k in glob}
        glob = optimizer.apply(glob, mean)
        if on_round is not None:
            on_round(server_round)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in optimizer.served(glob).items()})
    scores = score(model, test)
    return {"accuracy": scores.accuracy, "macro_f1": scores.macro_f1, "epsilon": epsilon, "seconds": time.monotonic() - start}


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, values parsed as TOML scalars would be (numbers, true/false, else text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        value: Any = raw
        if raw in ("true", "false"):
            value = raw == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    continue
        out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], help="a run-config key, e.g. --set dp=false")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cases", default="", help="cases separated by ';', each a space-separated list of key=value on top of --set")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    base = parse_sets(args.set)
    cases = [c.split() for c in args.cases.split(";")] if args.cases else [[]]
    print(f"# {time.strftime('%Y-%m-%d')} cmd: {' '.join(sys.argv)}", flush=True)
    print("| case | accuracy (median) | macro-F1 (median) | accuracy mean +- sd | macro-F1 mean +- sd | max epsilon | per seed (acc) | seconds/run |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for case in cases:
        values = {**base, **parse_sets(case)}
        runs = [federate({**values, "seed": int(s)}) for s in args.seeds.split(",")]
        accs = [r["accuracy"] for r in runs]
        f1s = [r["macro_f1"] for r in runs]
        secs = statistics.median(r["seconds"] for r in runs)
        spread = (lambda xs: f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}")  # noqa: E731
        eps = max(r["epsilon"] for r in runs)
        print(f"| {' '.join(case) or 'base'} | {statistics.median(accs):.4f} | {statistics.median(f1s):.4f} | {spread(accs)} | {spread(f1s)} | "
              f"{f'{eps:.3f}' if eps else 'no DP'} | {', '.join(f'{a:.3f}' for a in accs)} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
