"""`fedmm simulate --ray-address`: a federation on an existing, two-node Ray cluster.

The cluster is Ray's own, started here as a user would (``ray start --head`` and
``ray start --address``, each node with one CPU, its own resources and temp folder), on
this machine. The run must complete, its sites must have trained on both nodes (read from
Ray's timeline: each ``ClientAppActor.run`` task names its worker, and each node's log
folder names the workers it ran), fedmm must leave none of its processes behind, and the
cluster, stopped here by PID (never ``ray stop``: it stops every Ray on the machine),
must leave none of its own.

Also fast checks of the settings and of the preflight, which need no cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmm.config import RunConfig
from fedmm.errors import ConfigError, FederationError
from fedmm.runtime.ray_cluster import RaySettings, _checks_here

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0


# ---------------------------------------------------------------- settings (no cluster)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"site_cpus": 0}, "--site-cpus"),
        ({"site_cpus": 1.5}, "--site-cpus"),
        ({"site_cpus": True}, "--site-cpus"),
        ({"site_gpus": -0.5}, "--site-gpus"),
        ({"site_gpus": 1.5}, "--site-gpus"),
        ({"site_gpus": float("nan")}, "--site-gpus"),
        ({"address": "ray://head:10001"}, "--ray-address"),
        ({"address": "http://head:8265"}, "--ray-address"),
        ({"address": "head"}, "--ray-address"),
        ({"address": "head:0"}, "--ray-address"),
        ({"address": "head:70000"}, "--ray-address"),
    ],
)
def test_settings_out_of_range_are_refused(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        RaySettings(**kwargs)  # type: ignore[arg-type]
    assert "Fix:" in str(err.value) and "got" in str(err.value)


def test_settings_shape_flower_config_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert RaySettings().federation_config(4) == "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.0"
    assert RaySettings(site_cpus=2, site_gpus=0.5).federation_config(3) == (
        "num-supernodes=3 client-resources-num-cpus=2 client-resources-num-gpus=0.5"
    )
    assert RaySettings(address=" [::1]:6379 ").address == "[::1]:6379" and RaySettings(address="auto").attached
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")  # someone else's cluster: a private run must not attach to it
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    env = {"RAY_ADDRESS": "10.9.9.9:6379", "RAY_TMPDIR": str(tmp_path / "private"), "PYTHONPATH": "/x"}
    RaySettings().prepare_env(env, tmp_path)
    assert "RAY_ADDRESS" not in env and env["RAY_TMPDIR"] == str(tmp_path / "private") and env["PYTHONPATH"] == "/x"
    RaySettings(address="127.0.0.1:6379").prepare_env(env, tmp_path)
    assert env["RAY_ADDRESS"] == "127.0.0.1:6379"
    assert "RAY_TMPDIR" not in env  # `auto` looks in the user's Ray folder, not fedmm's private one
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path), "/x"])  # the checkout: the path every node has


def test_preflight_names_an_address_nobody_answers(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends
    cfg = RunConfig.from_run_config({"data": "synthetic:50", "runs-dir": str(tmp_path)})
    with pytest.raises(FederationError, match=f"no Ray cluster answers at --ray-address 127.0.0.1:{port}.*ray start --head --port={port}"):
        RaySettings(address=f"127.0.0.1:{port}").preflight(cfg, ROOT)
    assert RaySettings().preflight(cfg, ROOT) == []  # a private Ray: nothing to check


def test_node_check_fails_closed_without_a_shared_run_folder(tmp_path: Path) -> None:
    """A node that does not see the head's run folder would keep its own ledgers: refused before the run."""
    probe = tmp_path / "probe"
    probe.mkdir()
    request = {"app_dir": str(ROOT), "data": ""}
    assert _checks_here(request, "token", str(probe), "n1")["problems"] == [
        f"does not share the run folder {tmp_path}: the head's check file is not there"
    ]
    (probe / "head").write_text("token")
    assert _checks_here(request, "token", str(probe), "n1")["problems"] == []
    assert (probe / "n1").read_text() == "token"  # the head then sees what the node wrote
    bad = {"app_dir": str(tmp_path / "elsewhere"), "data": str(tmp_path / "missing")}
    problems = _checks_here(bad, "token", str(probe), "n2")["problems"]
    assert any("no fedmm checkout" in p for p in problems) and any("cannot read the data" in p for p in problems)


# ---------------------------------------------------------------- a real two-node cluster


@dataclass
class Node:
    name: str
    temp_dir: Path
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Cluster:
    address: str
    head: Node
    worker: Node


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    return env


def _start_node(name: str, temp_dir: Path, args: list[str]) -> Node:
    """``ray start --block``: the node's processes stay children of this one process (and its group)."""
    log = temp_dir.parent / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}", "--num-cpus=1", "--object-store-memory=200000000",
             "--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}", *args],
            env=_cluster_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    node = Node(name, temp_dir, process, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "block forever" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop_node(node)
            pytest.fail(f"`ray start` of the {name} node failed:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    return node


def _pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line holds ``text`` (a node's own temp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _stop_node(node: Node) -> None:
    """SIGTERM to ``ray start --block`` stops its node; then SIGKILL whatever of its group or folder is left."""
    if node.process.poll() is None:
        node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    for _ in range(50):
        try:
            os.killpg(node.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        left = _pids_mentioning(str(node.temp_dir))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not left:
            break
        time.sleep(0.2)
    if node.process.poll() is None:
        node.process.kill()
    node.process.wait()


@pytest.fixture
def two_node_cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="fmray-", dir="/tmp"))  # short: Ray's socket paths must stay under 107 characters
    port = _free_port()
    nodes: list[Node] = []
    try:
        nodes.append(_start_node("head", root / "h", [
            "--head", f"--port={port}", "--resources={\"head\": 1}", "--include-dashboard=false",
            f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        ]))
        nodes.append(_start_node("worker", root / "w", [f"--address=127.0.0.1:{port}", "--resources={\"worker\": 1}"]))
        yield Cluster(f"127.0.0.1:{port}", nodes[0], nodes[1])
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        left = {node.name: _pids_mentioning(str(node.temp_dir)) for node in nodes}
        shutil.rmtree(root, ignore_errors=True)
    assert left == {"head": [], "worker": []}, f"Ray processes of the test cluster outlived it: {left}"


_TIMELINE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, configure_logging=False)
try:
    events = [e for e in ray.timeline() if e.get("cat") == "task::ClientAppActor.run"]
    print(json.dumps({"runs": [e["tid"].split(":", 1)[1] for e in events], "nodes": [n["Resources"] for n in ray.nodes() if n["Alive"]]}))
finally:
    ray.shutdown()
"""


def _workers_of(node: Node) -> set[str]:
    """The Ray workers this node ran: its log folder names each (``worker-<id>-<job>-<pid>.out``)."""
    return {p.name.split("-")[1] for p in node.temp_dir.glob("session_*/logs/worker-*.out")}


def _processes_with_env(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{entry.name}: {command[:200]}")
            except OSError:
                continue
    return found


@pytest.mark.slow  # about 2 minutes on 2 busy cores: a real Ray cluster, then a real run on it
def test_simulate_attaches_to_a_two_node_ray_cluster(two_node_cluster: Cluster, tmp_path: Path) -> None:
    cluster = two_node_cluster
    # The preflight asks every node, from that node, for what the run needs there.
    cfg = RunConfig.from_run_config({"data": "synthetic:200", "runs-dir": str(tmp_path / "runs")})
    started = time.monotonic()
    reports = RaySettings(address=cluster.address).preflight(cfg, ROOT)
    preflight_s = time.monotonic() - started
    assert len({r["node_id"] for r in reports}) == 2 and all(r["problems"] == [] and r["fedmm"] for r in reports), reports
    marker = f"FEDMM_RAY_TEST={uuid.uuid4().hex}"
    env = _cluster_env()
    env[marker.split("=")[0]] = marker.split("=")[1]
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "fedmm"), "simulate", "--set", "data=synthetic:200", "--set", "sites=4", "--set", "rounds=2",
         "--set", f"runs-dir={tmp_path / 'runs'}", "--set", "run-name=ray2", "--ray-address", cluster.address],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL, check=False,
    )
    wall = time.monotonic() - started
    assert done.returncode == 0, f"fedmm simulate failed ({wall:.0f} s):\n{done.stdout[-4000:]}\n{done.stderr[-3000:]}"
    summary = json.loads((tmp_path / "runs" / "ray2" / "summary.json").read_text())
    assert (summary["status"], summary["rounds"], summary["sites"]) == ("completed", 2, 4)
    assert not list((tmp_path / "runs").glob(".fedmm-ray-check-*"))  # the preflight cleaned up after itself

    # fedmm started nothing that outlived the run (the cluster's own processes never carry the marker).
    assert _processes_with_env(marker) == []
    # ... and stopped nothing of the cluster: both nodes still up.
    assert cluster.head.process.poll() is None and cluster.worker.process.poll() is None

    # Where the sites ran: Ray's timeline names the worker of every ClientAppActor.run task.
    probe = subprocess.run([sys.executable, "-c", _TIMELINE, cluster.address], env=_cluster_env(), capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert probe.returncode == 0, probe.stderr[-3000:]
    timeline = json.loads(probe.stdout.strip().splitlines()[-1])
    assert sorted(sorted(k for k in r if k in ("head", "worker")) for r in timeline["nodes"]) == [["head"], ["worker"]]
    on_head = sum(w in _workers_of(cluster.head) for w in timeline["runs"])
    on_worker = sum(w in _workers_of(cluster.worker) for w in timeline["runs"])
    assert on_head + on_worker == len(timeline["runs"]) >= 4, timeline  # every task Ray recorded ran on one of the two nodes
    assert on_head >= 1 and on_worker >= 1, f"sites ran {on_head} tasks on the head and {on_worker} on the worker node"
    print(f"two-node Ray run: preflight {preflight_s:.1f} s, fedmm simulate {wall:.1f} s wall; ClientApp tasks: head {on_head}, worker {on_worker}")
