"""What a robust aggregation rule costs the server, against FedAvg, per round.

Times :func:`fedmm.federation.robust.aggregate` (the server's combining step alone, after
every update passed its checks) on random float32 updates of ``--params`` values split
into 8 tensors, for ``--sites`` sites, with each rule: ``fedavg``, ``trimmed-mean``,
``median`` and ``krum`` (``malicious-sites=1``). It also times the checks every update
passes first (``check_update`` with dtypes, shapes, finiteness and the norm against the
global model), which run whatever the rule. Prints medians of ``--repeats`` and each
rule's ratio to FedAvg.

    python benchmarks/robust_aggregation.py [--sites 10 50] [--params 100000 1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from fedmm.federation.checks import check_update  # noqa: E402
from fedmm.federation.robust import Aggregation, aggregate  # noqa: E402


def _median_time(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(sites: int, params: int, repeats: int) -> dict[str, float]:
    """Median seconds of each rule, and of checking every update, for one setting."""
    rng = np.random.default_rng(0)
    sizes = np.full(8, params // 8)
    glob = {f"t{i}": rng.normal(0, 0.05, n).astype(np.float32) for i, n in enumerate(sizes)}
    updates = [{k: v + rng.normal(0, 0.01, v.size).astype(np.float32) for k, v in glob.items()} for _ in range(sites)]
    weights = [int(w) for w in rng.integers(50, 500, sites)]
    out = {"checks": _median_time(lambda: [check_update(u, glob, max_norm=1e6, base=glob) for u in updates], repeats)}
    for rule in Aggregation:
        out[rule.value] = _median_time(lambda: aggregate(rule, updates, weights, malicious=1), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| sites | parameters | checks | fedavg | trimmed-mean | median | krum |")
    print("|---|---|---|---|---|---|---|")
    for params in args.params:
        for sites in args.sites:
            t = run(sites, params, args.repeats)
            base = t["fedavg"]
            cells = [f"{t['checks']:.3f} s"] + [f"{base:.3f} s"] + [f"{t[r]:.3f} s ({t[r] / base:.1f}x)" for r in ("trimmed-mean", "median", "krum")]
            print(f"| {sites} | {params:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
