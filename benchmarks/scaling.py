"""Scaling: ``fedmm simulate`` against the same work in a plain loop, and simulate at 10 to 10,000 sites.

One run prints one table. Every case runs as its own process (the real ``fedmm simulate``
CLI, or this file with ``--plain`` for the plain loop: :func:`benchmarks.inprocess.federate`,
fedmm's own site rounds and FedAvg, no Flower), side by side on the same machine. For each:

- wall: the process's wall time, start-up included;
- round: the median seconds of a round (``metrics.jsonl`` for simulate, timestamps for the
  plain loop), rounds after the first;
- peak RSS / PSS: the largest sum, over the process and everything it started (its
  descendants, and any process carrying this case's environment tag: Ray's workers),
  sampled from /proc every 0.2 s (PSS from ``smaps_rollup`` shares libraries fairly);
- ratio: wall over the plain loop's wall for the same work.

    python benchmarks/scaling.py                      # AV-MNIST default + 10, 100, 1,000 synthetic sites
    python benchmarks/scaling.py --sites 10,100 --ray --superlink   # also Ray workers and the SuperLink path for AV-MNIST
    python benchmarks/scaling.py --huge               # adds 10,000 sites (slow)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FEDMM = Path(sys.executable).parent / "fedmm"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(root: int, tag: bytes) -> set[int]:
    """``root``, its live descendants, and every process whose environment holds ``tag``."""
    parents: dict[int, int] = {}
    found = {root}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if tag in (entry / "environ").read_bytes():
                found.add(pid)
        except (OSError, ValueError, IndexError):
            continue
    frontier = [root]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current and p not in found]
        found.update(kids)
        frontier.extend(kids)
    return found


def _memory(pid: int) -> tuple[int, int]:
    """RSS and PSS of one process in bytes (0, 0 once it is gone)."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        pss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree every ``period`` seconds; keeps the peaks of the sums."""

    def __init__(self, pid: int, tag: bytes, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.tag, self.period = pid, tag, period
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid, self.tag)
            sizes = [_memory(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in sizes))
            self.peak_procs = max(self.peak_procs, sum(1 for r, _ in sizes if r))
            self.done.wait(self.period)


def measure(cmd: list[str], *, log: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd``; its wall time, exit code and the peak memory of its process tree."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "FEDMM_SCALING_TAG": tag, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sampler = TreeSampler(proc.pid, f"FEDMM_SCALING_TAG={tag}".encode())
        sampler.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            code = -9 if code == 0 else code
        wall = time.monotonic() - start
        sampler.done.set()
        sampler.join()
    # Nothing of the case may outlive it: stop every process that still carries its tag.
    for pid in _tree(proc.pid, f"FEDMM_SCALING_TAG={tag}".encode()) - {proc.pid}:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return {"wall": wall, "code": code, "rss": sampler.peak_rss, "pss": sampler.peak_pss, "procs": sampler.peak_procs}


def simulate(values: dict[str, Any], *, runs: Path, name: str, timeout: float, flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """The real CLI (with ``flags``, e.g. ``--ray``), in its own process."""
    sets = [a for k, v in {**values, "runs-dir": str(runs), "run-name": name}.items() for a in ("--set", f"{k}={v}")]
    cmd = [str(FEDMM), "simulate", *sets, *flags]
    out = measure(cmd, log=runs / f"{name}.log", timeout=timeout)
    metrics = runs / name / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    seconds = [r["seconds"] for r in rows if r.get("round", 0) >= 2 and "seconds" in r]
    summary = runs / name / "summary.json"
    status = json.loads(summary.read_text()).get("status", "?") if summary.is_file() else f"exit {out['code']}"
    return {**out, "round": statistics.median(seconds) if seconds else None, "status": status, "rounds": len(rows)}


def plain(values: dict[str, Any], *, runs: Path, name: str, timeout: float) -> dict[str, Any]:
    """The same work in a plain loop (benchmarks/inprocess.py's federate), in its own process."""
    result = runs / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", json.dumps(values), "--out", str(result)]
    out = measure(cmd, log=runs / f"{name}.log", timeout=timeout)
    if out["code"] != 0 or not result.is_file():
        return {**out, "round": None, "status": f"exit {out['code']}"}
    done = json.loads(result.read_text())
    return {**out, "round": done["round"], "status": "completed"}


def _run_plain(values: dict[str, Any], out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from inprocess import federate  # type: ignore[import-not-found]

    torch.set_num_threads(1)  # as each simulated site trains (fedmm.site.runner), and as inprocess.py runs
    stamps: list[float] = [time.monotonic()]
    result = federate(values, on_round=lambda _r: stamps.append(time.monotonic()))
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # rounds after the first
    out.write_text(json.dumps({**result, "round": statistics.median(gaps) if gaps else None}))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="avmnist:../shared/data", help="the data of the default run (AV-MNIST full)")
    parser.add_argument("--sites", default="10,100,1000", help="synthetic site counts, comma-separated ('' for none)")
    parser.add_argument("--huge", action="store_true", help="also 10,000 synthetic sites (slow)")
    parser.add_argument("--fraction", type=float, default=0.1, help="client-fraction of the synthetic runs")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the synthetic runs")
    parser.add_argument("--ray", action="store_true", help="also run the default case with `fedmm simulate --ray` (sites in Ray workers)")
    parser.add_argument("--superlink", action="store_true", help="also run the default case with `fedmm simulate --superlink`")
    parser.add_argument("--skip-default", action="store_true", help="only the synthetic cases")
    parser.add_argument("--no-plain", action="store_true", help="synthetic cases: fedmm simulate only, no plain loop (no ratio)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--keep", default="", help="keep the runs and logs in this folder (default: a temp folder, removed)")
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain is not None:
        _run_plain(json.loads(args.plain), Path(args.out))
        return
    runs = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="fedmm-scaling-"))
    runs.mkdir(parents=True, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} cmd: {' '.join(sys.argv)} ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})", flush=True)
    print("| case | sites | asked a round | rounds | wall s | wall / plain | round s (median) | peak RSS GiB | peak PSS GiB | procs | status |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|", flush=True)

    def row(case: str, sites: int, asked: int, values: dict[str, Any], got: dict[str, Any], base: dict[str, Any] | None) -> None:
        ratio = f"{got['wall'] / base['wall']:.2f}" if base and base.get("status") == "completed" else "-"
        rnd = f"{got['round']:.2f}" if got.get("round") is not None else "-"
        print(f"| {case} | {sites} | {asked} | {values['rounds']} | {got['wall']:.1f} | {ratio} | {rnd} | {_gib(got['rss'])} | "
              f"{_gib(got['pss'])} | {got['procs']} | {got['status']} |", flush=True)

    if not args.skip_default:
        values = {"data": args.data, "rounds": 20}
        base = plain(values, runs=runs, name="default-plain", timeout=args.timeout)
        row("AV-MNIST, plain loop", 6, 6, values, base, base)
        row("AV-MNIST, fedmm simulate", 6, 6, values, simulate(values, runs=runs, name="default-sim", timeout=args.timeout), base)
        if args.ray:
            row("AV-MNIST, simulate --ray", 6, 6, values,
                simulate(values, runs=runs, name="default-ray", timeout=args.timeout, flags=("--ray",)), base)
        if args.superlink:
            row("AV-MNIST, simulate --superlink", 6, 6, values,
                simulate(values, runs=runs, name="default-superlink", timeout=args.timeout, flags=("--superlink",)), base)
    counts = [int(c) for c in args.sites.split(",") if c.strip()] + ([10_000] if args.huge else [])
    for n in counts:
        values = {"data": f"synthetic:{20 * n}", "sites": n, "partitioner": "iid", "rounds": args.rounds, "client-fraction": args.fraction}
        asked = max(1, math.ceil(args.fraction * n - 1e-9))
        base = None if args.no_plain else plain(values, runs=runs, name=f"syn{n}-plain", timeout=args.timeout)
        if base is not None:
            row("synthetic, plain loop", n, asked, values, base, base)
        row("synthetic, fedmm simulate", n, asked, values, simulate(values, runs=runs, name=f"syn{n}-sim", timeout=args.timeout), base)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}", flush=True)
    if not args.keep:
        shutil.rmtree(runs, ignore_errors=True)
    else:
        print(f"runs and logs kept in {runs}", flush=True)


if __name__ == "__main__":
    main()
