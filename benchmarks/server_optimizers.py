"""Server optimizers, FedProx, server EMA and the sites' learning-rate schedules on AV-MNIST.

An in-process federation (no Flower, no processes): every round each site runs fedmm's own
:func:`fedmm.site.round.train_round` (its data as a simulated site sees it, DP-SGD and its
accountant as in a real run), the server averages the updates as FedAvg does (weights of 1
under DP, num-examples otherwise) and applies :class:`fedmm.federation.server_opt.ServerOptimizer`;
the model the server serves (the EMA when ``server-ema`` is set) is scored on the server's
held-out set after the last round. Prints, per case and DP setting, the median accuracy over
seeds (the per-seed values) and its ratio to fedavg's median.

    python benchmarks/server_optimizers.py [--rounds 10] [--seeds 0,1,2] [--dp both|true|false] [--only fedadam,fedyogi]
        [--lrs fedadam=0.003,0.01,0.03]  (a sweep: adds one case per server learning rate)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedmm.config import RunConfig  # noqa: E402
from fedmm.data.normalise import normalise  # noqa: E402
from fedmm.data.sources import load_source  # noqa: E402
from fedmm.federation.server_opt import ServerOptimizer, server_learning_rate  # noqa: E402
from fedmm.models.evaluation import evaluate  # noqa: E402
from fedmm.plan import RunPlan  # noqa: E402
from fedmm.privacy.accounting import SiteAccountant  # noqa: E402
from fedmm.site.data import site_data  # noqa: E402
from fedmm.site.round import SiteState, train_round  # noqa: E402

CASES: list[tuple[str, dict[str, object]]] = [
    ("fedavg", {}),
    ("fedavgm", {"strategy": "fedavgm"}),
    ("fedadam", {"strategy": "fedadam"}),
    ("fedyogi", {"strategy": "fedyogi"}),
    ("fedadagrad", {"strategy": "fedadagrad"}),
    ("fedprox mu=0.01", {"strategy": "fedprox", "proximal_mu": 0.01}),
    ("fedprox mu=0.1", {"strategy": "fedprox", "proximal_mu": 0.1}),
    ("fedavg + server-ema 0.5", {"server_ema": 0.5}),
    ("fedavg + cosine", {"lr_schedule": "cosine"}),
    ("fedavg + cosine + warm-up 2", {"lr_schedule": "cosine", "lr_warmup_rounds": 2}),
]


def run_case(settings: dict[str, object], *, dp: bool, seed: int, rounds: int) -> float:
    """Accuracy of the served model after ``rounds`` rounds of one in-process federation."""
    cfg = RunConfig(data="avmnist", dp=dp, seed=seed, rounds=rounds, **settings)  # type: ignore[arg-type]
    plan = RunPlan.from_config(cfg)
    source = load_source(cfg.data, plan.preprocessing, classes=cfg.class_list, test_fraction=cfg.test_fraction)
    test_raw = normalise(source.require_test(), sensor_norm=cfg.sensor_norm, site_statistics=not cfg.dp, held_out=True)
    recipe = plan.model
    test = recipe.prepare(test_raw, tasks_from=recipe.task_classes(test_raw))
    model = recipe.build(test.schema, seed=cfg.seed)
    sites = [site_data({"partition-id": i, "num-partitions": 6}, cfg) for i in range(6)]
    cfg = cfg.replace(sites=len(sites))
    states = {name: SiteState(plan=None, accountant=SiteAccountant(cfg.accountant)) for name, _ in sites}
    optimizer = ServerOptimizer.from_config(cfg)
    glob = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    for server_round in range(1, rounds + 1):
        updates, weights = [], []
        for name, data in sites:
            out = train_round(cfg=cfg, site=name, data=data, global_weights={k: torch.from_numpy(v.copy()) for k, v in glob.items()},
                              server_round=server_round, state=states[name])
            updates.append({k: v.numpy().astype(np.float64) for k, v in out.state_dict.items()})
            weights.append(1.0 if dp else float(out.num_examples))
        total = sum(weights)
        mean = {k: (sum(w * u[k] for w, u in zip(weights, updates)) / total).astype(glob[k].dtype) for k in glob}
        glob = optimizer.apply(glob, mean)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in optimizer.served(glob).items()})
    return evaluate(model, test)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dp", default="both", choices=("both", "true", "false"))
    parser.add_argument("--only", default="", help="comma-separated case names, e.g. fedavg,fedadam (none: every case)")
    parser.add_argument("--lrs", default="", help="sweep, e.g. fedadam=0.003,0.01,0.03;fedyogi=0.01,0.03")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    seeds = [int(s) for s in args.seeds.split(",")]
    cases = [c for c in CASES if not args.only or c[0] in args.only.split(",")]
    for part in filter(None, args.lrs.split(";")):
        strategy, _, lrs = part.partition("=")
        cases += [(f"{strategy} lr={lr}", {"strategy": strategy, "server_learning_rate": float(lr)}) for lr in lrs.split(",")]
    dps = {"both": [True, False], "true": [True], "false": [False]}[args.dp]
    print(f"# {time.strftime('%Y-%m-%d')}  rounds={args.rounds}  seeds={seeds}  cmd: {' '.join(sys.argv)}", flush=True)
    print("| case | server lr | dp | accuracy (median) | per seed | vs fedavg | seconds/run |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for dp in dps:
        base = None
        for name, settings in cases:
            start = time.monotonic()
            accs = [run_case(settings, dp=dp, seed=s, rounds=args.rounds) for s in seeds]
            seconds = (time.monotonic() - start) / len(seeds)
            median = statistics.median(accs)
            if name == "fedavg":
                base = median
            lr = server_learning_rate(RunConfig(**settings))  # type: ignore[arg-type]
            ratio = f"{median / base:.3f}" if base else "-"
            print(f"| {name} | {lr:g} | {dp} | {median:.4f} | {', '.join(f'{a:.3f}' for a in accs)} | {ratio} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
