"""Deployed against simulated round time for the same work, before and after fedmm's latency work.

The same federation (the built-in AV-MNIST sites george, jackson and lucas, DP-SGD, with or
without SecAgg+) runs four ways, one after the other on this machine, each site training on
exactly the same records:

- ``simulated``: ``fedmm simulate`` (Flower's simulation engine);
- ``Flower defaults``: ``fedmm server`` + three ``fedmm site`` processes on loopback with TLS
  and SuperNode authentication, as Flower behaves out of the box (site ``runtime = "flower"``):
  a new ``flwr-clientapp`` process for every message, the SuperExec polling for tasks every
  1 s, the SuperNode idling 3 s between polls, objects retried after 1 s, 2 s ..., the
  ServerApp's grid pulling replies every 3 s;
- ``fedmm``: the same with fedmm's defaults: one long-lived ClientApp executor per site
  (:mod:`fedmm.runtime.executor`), 0.1 s polls and 20 ms object retries (:mod:`fedmm.runtime.flower_waits`);
- ``fedmm, in-memory server``: as ``fedmm``, with ``fedmm server --in-memory`` (no SuperLink
  database; a restarted server forgets its registered sites).

Each figure is the median of the per-round ``seconds`` in ``metrics.jsonl`` over rounds
2..R (round 1 includes the sites' first data load).

    python benchmarks/deploy_latency.py [--rounds 4] [--secure both|true|false]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmm.runtime.loopback import CLI_POLL, LoopbackDeployment

SITES = ("george", "jackson", "lucas")
RESULTS = Path(__file__).parent / "results"


def _round_seconds(run: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()][1:]


def simulated(root: Path, config: str) -> list[float]:
    settings = [a for kv in config.split() for a in ("--set", kv)]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    done = subprocess.run([str(Path(sys.executable).parent / "fedmm"), "simulate", *settings, "--set", f"runs-dir='{root}'", "--set", "run-name='sim'"],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return _round_seconds(root / "sim")


def deployed(root: Path, config: str, *, tuned: bool, in_memory: bool = False) -> list[float]:
    env = {} if tuned else {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0", "FEDMM_FLOWER_WAITS": "flower"}
    deploy = LoopbackDeployment(root, env=env, server_options=("--in-memory",) if in_memory else ())
    try:
        deploy.start_federation(SITES, site_lines="" if tuned else "runtime = \"flower\"\n")
        run_id = deploy.submit(f"{config} runs-dir='{root / 'runs'}' run-name='dep'")
        # Wait on the run's own summary; ask `flwr ls` (a CLI process, which would compete for the
        # CPU with the round being timed) only every 20 s, in case the run failed.
        last = {"asked": time.monotonic()}

        def ended() -> bool:
            if (root / "runs" / "dep" / "summary.json").exists():
                return True
            if time.monotonic() - last["asked"] < 20:
                return False
            last["asked"] = time.monotonic()
            return deploy.run_status(run_id).startswith("finished")

        deploy.wait_for("the run", ended, timeout=1800)
        deploy.wait_for("the run to end", lambda: deploy.run_status(run_id).startswith("finished"), timeout=120, interval=CLI_POLL)
        if deploy.run_status(run_id) != "finished:completed":
            raise RuntimeError(f"deployed run ended {deploy.run_status(run_id)}")
    finally:
        deploy.stop_all()
    return _round_seconds(root / "runs" / "dep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--secure", choices=["both", "true", "false"], default="both")
    args = parser.parse_args()
    rows = []
    for secure in ([False, True] if args.secure == "both" else [args.secure == "true"]):
        config = f"sites=3 rounds={args.rounds} secure-aggregation={'true' if secure else 'false'} secagg-timeout=120.0"
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            sim = statistics.median(simulated(root / "sim", config))
            before = statistics.median(deployed(root / "before", config, tuned=False))
            after = statistics.median(deployed(root / "after", config, tuned=True))
            memory = statistics.median(deployed(root / "memory", config, tuned=True, in_memory=True))
        row = {"secure_aggregation": secure, "rounds": args.rounds, "simulated_s": sim, "deployed_flower_defaults_s": before,
               "deployed_fedmm_s": after, "deployed_fedmm_in_memory_s": memory,
               "before_ratio": before / sim, "after_ratio": after / sim, "in_memory_ratio": memory / sim}
        rows.append(row)
        print(f"secure-aggregation={str(secure).lower():5}  simulated {sim:6.2f} s/round | Flower defaults {before:6.2f} s ({before / sim:5.1f}x) | "
              f"fedmm {after:6.2f} s ({after / sim:5.1f}x) | fedmm, in-memory server {memory:6.2f} s ({memory / sim:5.1f}x) | "
              f"fedmm vs Flower defaults {after / before:.2f}x", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deploy_latency.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
