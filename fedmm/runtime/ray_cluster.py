"""``fedmm simulate`` on Ray: a private local Ray (the default) or an existing Ray cluster.

Flower's simulation engine runs the virtual sites as Ray actors. Flower 1.42 has no
setting for the cluster's address: its Ray backend calls ``ray.init()``, which attaches
to the cluster named by ``RAY_ADDRESS`` (``HOST:PORT`` of the head's GCS, or ``auto``).
So fedmm attaches by setting ``RAY_ADDRESS`` for the processes it starts, and sets the
resources of one site (one Ray actor) through ``flwr run --federation-config``.

Attaching starts and stops nothing of the cluster. Before the run, :meth:`RaySettings.preflight`
checks every node that can host a site, from that node: the same fedmm install, the
Flower App's checkout at the same path, the data, and a run folder shared with the head.
The last one is a privacy check: a site's ledger lives in the run folder, and a site may
train on a different node each round; with a folder private to each node a site would
find an empty ledger there and under-count its spend.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmm.config import RunConfig
from fedmm.errors import ConfigError, FederationError

__all__ = ["RaySettings"]

_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")
_PROBE_TIMEOUT_S = 180.0
_MAX_CPUS = 4096


@dataclass(frozen=True)
class RaySettings:
    """Where the virtual sites run, and what each one gets.

    ``address``: empty for a private Ray started for this run and stopped after it (the
    default); ``HOST:PORT`` (the head's ``ray start --head --port``) or ``auto`` to attach to
    a running cluster. ``site_cpus``/``site_gpus``: Ray resources of one site (one actor);
    Flower runs as many sites at once as fit on each node.
    """

    address: str = ""
    site_cpus: int = 1
    site_gpus: float = 0.0

    def __post_init__(self) -> None:
        address = self.address.strip()
        object.__setattr__(self, "address", address)
        if address and address != "auto":
            if "://" in address:
                raise ConfigError(
                    "--ray-address", "must be the head's HOST:PORT or 'auto'; Ray Client (ray://) and dashboard (http://) "
                    "addresses are not supported: Flower's simulation attaches as a Ray driver on a node of the cluster",
                    value=address, fix="run fedmm simulate on the head node with --ray-address HEAD_IP:6379 (the port of `ray start --head`)",
                )
            match = _ADDRESS.fullmatch(address)
            if match is None or not 1 <= int(match["port"]) <= 65535:
                raise ConfigError("--ray-address", "must be HOST:PORT with a port in 1..65535, or 'auto'", value=address,
                                  fix="e.g. --ray-address 10.0.0.1:6379 (the port given to `ray start --head --port`)")
        if isinstance(self.site_cpus, bool) or not isinstance(self.site_cpus, int) or not 1 <= self.site_cpus <= _MAX_CPUS:
            raise ConfigError("--site-cpus", f"must be a whole number of CPUs in 1..{_MAX_CPUS} (Flower's simulation takes whole CPUs)",
                              value=self.site_cpus, fix="e.g. --site-cpus 1: one site per CPU")
        gpus = self.site_gpus
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not math.isfinite(gpus) or gpus < 0:
            raise ConfigError("--site-gpus", "must be a number >= 0", value=gpus, fix="e.g. --site-gpus 0.5: two sites share a GPU")
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError("--site-gpus", "above 1 must be a whole number (Ray's rule for fractional resources)", value=gpus,
                              fix=f"use {math.ceil(gpus)}, or a fraction below 1")
        if gpus > 0 and not address:
            # A private Ray sees this machine's GPUs; none means Flower fails late with an empty actor pool.
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None and not visible.strip():
                raise ConfigError("--site-gpus", "asks for GPUs, but CUDA_VISIBLE_DEVICES hides every GPU from the local Ray", value=gpus,
                                  fix="unset CUDA_VISIBLE_DEVICES, or --site-gpus 0")

    @property
    def attached(self) -> bool:
        """True when the run attaches to an existing cluster (fedmm starts and stops no Ray)."""
        return bool(self.address)

    def federation_config(self, sites: int | None) -> str:
        """The ``flwr run --federation-config`` value: the number of sites and one site's resources."""
        if sites is None:
            raise FederationError("the number of sites is not resolved (sites=auto is resolved by `fedmm simulate` from the data)")
        return f"num-supernodes={sites} client-resources-num-cpus={self.site_cpus} client-resources-num-gpus={float(self.site_gpus)}"

    def prepare_env(self, env: dict[str, str], app_dir: Path) -> None:
        """Point the environment of the processes fedmm starts at the right Ray."""
        if not self.attached:
            env.pop("RAY_ADDRESS", None)  # a stray RAY_ADDRESS would attach to someone's cluster unasked
            return
        env["RAY_ADDRESS"] = self.address
        # `auto` finds the cluster in the user's Ray temp folder, not in fedmm's private one.
        if "RAY_TMPDIR" in os.environ:
            env["RAY_TMPDIR"] = os.environ["RAY_TMPDIR"]
        else:
            env.pop("RAY_TMPDIR", None)
        # Flower hands its actors the driver's import path; the checkout's own path is the one every node has.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(app_dir), env.get("PYTHONPATH", "")) if p)

    def preflight(self, cfg: RunConfig, app_dir: Path) -> list[dict[str, Any]]:
        """Check, from every node that can host a site, what the run needs there; return one report per node.

        Raises :class:`FederationError` naming each node and what is wrong there. Does nothing
        (returns ``[]``) for a private Ray.
        """
        if not self.attached:
            return []
        if self.address != "auto":
            host, _, port = self.address.rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                    pass
            except OSError as err:
                raise FederationError(
                    f"no Ray cluster answers at --ray-address {self.address} ({err}). Fix: start the head with "
                    f"`ray start --head --port={port}`, or give the address `ray start --head` printed"
                ) from None
        shared = [Path(cfg.runs_dir).expanduser().resolve()]
        if cfg.site_state_dir:
            shared.append(Path(cfg.site_state_dir).expanduser().resolve())
        name, sep, location = cfg.data.partition(":")
        data = str(Path(location).expanduser().resolve()) if sep and name != "synthetic" and location else ""
        request = {"address": self.address, "cpus": self.site_cpus, "gpus": float(self.site_gpus), "app_dir": str(app_dir),
                   "shared": [str(p) for p in shared], "data": data}
        env = dict(os.environ)
        self.prepare_env(env, app_dir)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        for folder in shared:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run([sys.executable, "-m", "fedmm.runtime.ray_cluster", json.dumps(request)], env=env, capture_output=True,
                                  text=True, timeout=_PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            raise FederationError(f"checking the Ray cluster at {self.address} took over {_PROBE_TIMEOUT_S:.0f} s; is every node up (`ray status`)?") from None
        lines = done.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            answer = {}
        if done.returncode != 0 or "nodes" not in answer:
            detail = answer.get("error") or done.stderr.strip()[-1500:] or f"exit {done.returncode}"
            raise FederationError(f"could not check the Ray cluster at {self.address}: {detail}")
        nodes: list[dict[str, Any]] = answer["nodes"]
        if not nodes:
            raise FederationError(
                f"no node of the Ray cluster at {self.address} can host one site ({self.site_cpus} CPU, {self.site_gpus:g} GPU); "
                f"nodes: {answer.get('all', [])}. Fix: lower --site-cpus/--site-gpus, or start nodes with more (`ray start --num-cpus`)"
            )
        problems = [f"node {n['node_id'][:12]} ({n['host']}): {p}" for n in nodes for p in n["problems"]]
        if problems:
            raise FederationError(
                "the Ray cluster cannot run this federation as it stands:\n  " + "\n  ".join(problems) +
                "\nFix: every node needs the same fedmm checkout and venv at the same path, the data at the same path, and the run "
                "folder (runs-dir, and site-state-dir if set) on storage shared by every node at the same path (docs/runs.md)"
            )
        return nodes


def _node_check(request: dict[str, Any], token: str, probe_dir: str) -> dict[str, Any]:
    """Run on one node as a Ray task (pickled by value, so it runs even where fedmm is missing)."""
    import ray as _ray

    return _checks_here(request, token, probe_dir, _ray.get_runtime_context().get_node_id())


def _checks_here(request: dict[str, Any], token: str, probe_dir: str, node_id: str) -> dict[str, Any]:
    """What this machine lacks to host a site of the run ``request`` describes (see :meth:`RaySettings.preflight`)."""
    import os as _os
    import socket as _socket
    import sys as _sys
    from pathlib import Path as _Path

    problems = []
    try:
        import fedmm as _fedmm

        version = str(getattr(_fedmm, "__version__", "?"))
    except ImportError:
        version = ""
        problems.append(f"fedmm is not installed for {_sys.executable}")
    if not (_Path(request["app_dir"]) / "clients" / "app.py").is_file():
        problems.append(f"no fedmm checkout at {request['app_dir']} (the Flower App the sites load)")
    if request["data"] and not _os.access(request["data"], _os.R_OK):
        problems.append(f"cannot read the data at {request['data']}")
    probe = _Path(probe_dir)
    try:
        seen = (probe / "head").read_text()
    except OSError:
        seen = ""
    if seen != token:
        problems.append(f"does not share the run folder {probe.parent}: the head's check file is not there")
    else:
        try:
            (probe / node_id).write_text(token)
        except OSError as err:
            problems.append(f"cannot write in the shared run folder {probe.parent}: {err}")
    return {"node_id": node_id, "host": _socket.gethostname(), "python": _sys.executable, "fedmm": version, "problems": problems}


def _probe(request: dict[str, Any]) -> dict[str, Any]:
    """Attach to the cluster as a short-lived driver and run :func:`_node_check` on every node that can host a site."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=request["address"], logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        fits = [n for n in alive if n["Resources"].get("CPU", 0) >= request["cpus"] and n["Resources"].get("GPU", 0) >= request["gpus"]]
        summary = [{"node_id": n["NodeID"], "resources": {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}} for n in alive]
        checks, probes = [], []
        check = ray.remote(_node_check)
        try:
            for folder in request["shared"]:
                probe = Path(folder) / f".fedmm-ray-check-{uuid.uuid4().hex}"
                probe.mkdir(parents=True)
                probes.append(probe)
                token = uuid.uuid4().hex
                (probe / "head").write_text(token)
                for node in fits:
                    strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
                    checks.append(check.options(num_cpus=0, scheduling_strategy=strategy).remote(request, token, str(probe)))
            results = ray.get(checks, timeout=_PROBE_TIMEOUT_S - 30)
        finally:
            for probe in probes:
                shutil.rmtree(probe, ignore_errors=True)
        merged: dict[str, dict[str, Any]] = {}
        for result in results:
            if result["node_id"] in merged:
                merged[result["node_id"]]["problems"] += [p for p in result["problems"] if p not in merged[result["node_id"]]["problems"]]
            else:
                merged[result["node_id"]] = result
        return {"nodes": list(merged.values()), "all": summary}
    finally:
        ray.shutdown()


if __name__ == "__main__":  # the preflight's short-lived Ray driver: `python -m fedmm.runtime.ray_cluster REQUEST_JSON`
    try:
        print(json.dumps(_probe(json.loads(sys.argv[1]))))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises FederationError
        print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
        sys.exit(1)
