"""Server optimizers, FedProx, server EMA and the sites' learning-rate schedules on AV-MNIST.

An in-process federation (no Flower, no processes; ``benchmarks/inprocess.py``): every round each site runs fedmm's own
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

import torch  # noqa: E402

from fedmm.config import RunConfig  # noqa: E402
from fedmm.plan import server_learning_rate  # noqa: E402
from inprocess import federate  # noqa: E402  (benchmarks/inprocess.py: the same in-process federation)

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
    """Accuracy of the served model after ``rounds`` rounds of one in-process federation (benchmarks/inprocess.py)."""
    values = {"data": "avmnist", "dp": dp, "seed": seed, "rounds": rounds, **{k.replace("_", "-"): v for k, v in settings.items()}}
    return federate(values)["accuracy"]


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
