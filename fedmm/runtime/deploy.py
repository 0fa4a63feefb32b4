"""Deploying fedmm: one server (Flower SuperLink) and one client process per data site.

``fedmm server`` and ``fedmm site`` start Flower's own ``flower-superlink`` and
``flower-supernode`` with fedmm's settings, never a transport of fedmm's:

- TLS with the certificates of ``fedmm certs`` and SuperNode authentication, always on;
- runtime dependency installation off (the app's dependencies are installed by the
  operator, not fetched by the SuperLink at run time);
- the SuperLink's state (registered sites, runs) in a SQLite database, so a restarted
  server knows its sites again.

A site's own settings live in its own TOML file, which the server never sees::

    [site]
    name = "george"                              # the site's identity in ledgers and reports
    superlink = "server.example.org:9092"
    ca = "/etc/fedmm/ca.crt"                     # to verify the server
    key = "/etc/fedmm/george.key"                # SuperNode key, registered by the operator
    data = "manifest:/srv/george/manifest.csv"   # the site's own files (optional in a demo)
    state-dir = "/srv/george/fedmm"              # ledger, SuperExec secret
    epsilon-budget = 8.0                         # lifetime, over every run
    delta = 1e-5
    min-noise-multiplier = 0.5
    min-batch-size = 16                          # the smallest batch-size it takes
    require-dp = true

These become the SuperNode's ``--node-config``, which only the site sets and every round
reads (:mod:`fedmm.privacy.policy`): the server cannot raise a budget or lower a floor.
"""

from __future__ import annotations

import difflib
import math
import os
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmm import protocol
from fedmm.federation.presence import DATABASE_ENV
from fedmm.privacy.policy import DEFAULT_MIN_BATCH
from fedmm.secure.identity import KEYS_ENV
from fedmm.secure.probe import check_site_keys, probe_superlink, split_address
from fedmm.errors import ConfigError
from fedmm.runtime.executor import SECRET_FILE, make_secret
from fedmm.runtime.supernode import HEARTBEAT_ENV, POLL_ENV
from fedmm.runtime.supervise import spawn, supervise

__all__ = ["SiteSettings", "executor_command", "flower_env", "run_server", "run_site", "server_command", "supernode_command", "write_connection"]

_SITE_KEYS = {
    "name", "superlink", "ca", "key", "data", "state-dir", "epsilon-budget", "delta", "min-noise-multiplier", "min-batch-size", "require-dp",
    "clientapp-port", "runtime", "poll-interval", "heartbeat-interval", "lenient",
}
_RUNTIMES = ("fedmm", "flower")


@dataclass(frozen=True)
class SiteSettings:
    """A site's own configuration (its ``[site]`` table)."""

    name: str
    superlink: str
    ca: Path
    key: Path
    state_dir: Path
    epsilon_budget: float
    data: str = ""
    delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    require_dp: bool = True
    lenient: bool = False  # skip (and count) the site's own bad rows; never the server's to set
    min_batch_size: int = DEFAULT_MIN_BATCH  # the smallest batch-size the site takes (its sample rate tells n to within a batch)
    clientapp_port: int = 9094  # the SuperNode's local Runtime API port (its ClientApp executor connects there)
    # "fedmm": one long-lived ClientApp executor (fedmm.runtime.executor) and short SuperNode waits (fedmm.runtime.supernode);
    # "flower": Flower's defaults, a new flwr-clientapp process for every message and a 3 s idle poll.
    runtime: str = "fedmm"
    poll_interval: float = 0.1  # seconds the SuperNode waits between asks to the SuperLink (runtime "fedmm")
    heartbeat_interval: float = 3.0  # seconds between "alive" signals; the server names the site lost ~2 intervals after it dies

    @classmethod
    def load(cls, path: str | Path) -> SiteSettings:
        """Read and check a site's TOML file.

        Raises
        ------
        ConfigError
            For a missing file, invalid TOML, an unknown or missing key, a value out of
            range, or a certificate/key file that does not exist.
        """
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text()).get("site")
        except OSError as err:
            raise ConfigError("site config", f"cannot read {path} ({err.strerror})", value=str(path), fix="give the path of the site's TOML file") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError("site config", f"{path} is not valid TOML ({err})", value=str(path), fix="correct the file") from err
        if not isinstance(table, dict):
            raise ConfigError("site config", f"{path} has no [site] table", value=str(path), fix="put the site's keys under [site]")
        unknown = sorted(set(table) - _SITE_KEYS)
        if unknown:
            close = difflib.get_close_matches(unknown[0].replace("_", "-"), sorted(_SITE_KEYS), n=1)
            raise ConfigError(f"site.{unknown[0]}", f"unknown key in {path}", value=table[unknown[0]],
                              fix=(f"did you mean {close[0]!r}? " if close else "") + f"known keys: {', '.join(sorted(_SITE_KEYS))}")
        for key in ("name", "superlink", "ca", "key", "state-dir", "epsilon-budget"):
            if key not in table:
                raise ConfigError(f"site.{key}", f"missing in {path}", fix="see docs/deploy.md for a complete site file")
        base = path.parent

        def file(key: str) -> Path:
            value = (base / str(table[key])).expanduser()
            if not value.is_file():
                raise ConfigError(f"site.{key}", f"file not found: {value}", value=table[key], fix="create it with 'fedmm certs' and copy it to this site")
            return value.resolve()

        budget = table["epsilon-budget"]
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
            raise ConfigError("site.epsilon-budget", "must be a positive number", value=budget, fix="e.g. epsilon-budget = 8.0")
        delta = table.get("delta", 1e-5)
        if not isinstance(delta, float) or not 0 < delta < 1:
            raise ConfigError("site.delta", "must be in (0, 1)", value=delta, fix="e.g. delta = 1e-5")
        floor = table.get("min-noise-multiplier", 0.5)
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) or floor < 0:
            raise ConfigError("site.min-noise-multiplier", "must be a number >= 0", value=floor, fix="e.g. min-noise-multiplier = 0.5")
        min_batch = table.get("min-batch-size", DEFAULT_MIN_BATCH)
        if isinstance(min_batch, bool) or not isinstance(min_batch, int) or min_batch < 1:
            raise ConfigError("site.min-batch-size", "must be a whole number >= 1", value=min_batch, fix=f"e.g. min-batch-size = {DEFAULT_MIN_BATCH}")
        require_dp = table.get("require-dp", True)
        if not isinstance(require_dp, bool):  # "false" (a string) would read as true
            raise ConfigError("site.require-dp", "must be true or false, without quotes", value=require_dp, fix="e.g. require-dp = true")
        lenient = table.get("lenient", False)
        if not isinstance(lenient, bool):
            raise ConfigError("site.lenient", "must be true or false, without quotes", value=lenient, fix="e.g. lenient = true")
        for key, kind in (("name", str), ("superlink", str), ("data", str), ("clientapp-port", int)):
            if key in table and (isinstance(table[key], bool) or not isinstance(table[key], kind)):
                raise ConfigError(f"site.{key}", f"must be {'text' if kind is str else 'an integer'}", value=table[key], fix=f"see docs/deploy.md for {key}")
        port = table.get("clientapp-port", 9094)
        if not 1 <= port <= 65535:
            raise ConfigError("site.clientapp-port", "must be a port number in [1, 65535]", value=port, fix="e.g. clientapp-port = 9094")
        name = str(table["name"])
        if not name or any(c in name for c in "/\\'\" "):
            raise ConfigError("site.name", "must be a plain name (no quotes, spaces or slashes)", value=name, fix="e.g. name = \"hospital-a\"")
        data = str(table.get("data", ""))
        if data.startswith("manifest:"):
            manifest = (base / data.removeprefix("manifest:")).expanduser()
            if not manifest.is_file():
                raise ConfigError("site.data", f"manifest not found: {manifest}", value=data, fix="point data at the site's manifest CSV")
            data = f"manifest:{manifest.resolve()}"
        runtime = str(table.get("runtime", "fedmm"))
        if runtime not in _RUNTIMES:
            raise ConfigError("site.runtime", f"must be one of {', '.join(_RUNTIMES)}", value=runtime, fix='runtime = "fedmm" (a long-lived ClientApp process; the default)')
        poll = table.get("poll-interval", 0.1)
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0.01 <= poll <= 3:
            raise ConfigError("site.poll-interval", "must be a number of seconds in [0.01, 3]", value=poll, fix="e.g. poll-interval = 0.1 (larger: fewer requests to the server, slower rounds)")
        heartbeat = table.get("heartbeat-interval", 3.0)
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)) or not 1 <= heartbeat <= 30:
            raise ConfigError(
                "site.heartbeat-interval", "must be a number of seconds in [1, 30]", value=heartbeat,
                fix="e.g. heartbeat-interval = 3.0 (the server names a dead site lost after about twice this)",
            )
        try:
            split_address(str(table["superlink"]))
        except ValueError:  # Flower's SuperNode exits on it; said here with the key and a fix
            raise ConfigError("site.superlink", "must be the server's host:port", value=table["superlink"],
                              fix='e.g. superlink = "fl.example.org:9092" (IPv6: "[2001:db8::1]:9092")') from None
        ca_file, key_file = file("ca"), file("key")
        wrong = check_site_keys(ca_file, key_file)  # a file that is not a certificate (or key) left the SuperNode retrying for ever
        if wrong:
            which = sorted(wrong)[0]
            raise ConfigError(f"site.{which}", f"{ca_file if which == 'ca' else key_file} {wrong[which]}", value=table[which],
                              fix="ca: the federation's ca.crt from the server operator; key: this site's <name>.key from `fedmm certs site` (docs/deploy.md)")
        return cls(
            name=name, superlink=str(table["superlink"]), ca=ca_file, key=key_file,
            state_dir=(base / str(table["state-dir"])).expanduser().resolve(), epsilon_budget=float(budget), data=data,
            delta=float(delta), min_noise_multiplier=float(floor), min_batch_size=min_batch,
            require_dp=require_dp, lenient=lenient, clientapp_port=int(port),
            runtime=runtime, poll_interval=float(poll), heartbeat_interval=float(heartbeat),
        )

    def node_config(self) -> str:
        """The SuperNode's ``--node-config``: the site's name, data and privacy policy."""
        values: dict[str, Any] = {
            protocol.NODE_SITE: self.name, protocol.NODE_STATE_DIR: str(self.state_dir),
            protocol.NODE_EPSILON_BUDGET: self.epsilon_budget, protocol.NODE_DELTA: self.delta,
            protocol.NODE_MIN_NOISE: self.min_noise_multiplier, protocol.NODE_MIN_BATCH: self.min_batch_size, protocol.NODE_REQUIRE_DP: self.require_dp,
            protocol.NODE_KEY: str(self.key),  # signs the site's claim to its name in every reply (fedmm.secure.identity)
        }
        if self.data:
            values[protocol.NODE_DATA] = self.data
            values[protocol.NODE_LENIENT] = self.lenient
        return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value) + "'"


def flower_env() -> dict[str, str]:
    """The environment for Flower's processes: fedmm's venv first on PATH (they start each other by name)."""
    # Flower's SuperExec looks for a new task (a message to start a ClientApp for) every second by
    # default; every SecAgg+ round has four such messages, so look every 0.1 s.
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def server_command(pki: Path, state_dir: Path, *, host: str = "0.0.0.0", port: int = 9092, in_memory: bool = False) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication, a database (unless ``in_memory``) and no runtime installs."""
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (pki / name).is_file():
            raise ConfigError("--pki", f"{pki / name} not found", value=str(pki), fix="create it with 'fedmm certs init PKI --san <server host>'")
    return [
        sys.executable, "-m", "fedmm.runtime.superlink",  # Flower's flower-superlink, accepting heartbeats down to 1 s
        "--ssl-ca-certfile", str(pki / "ca.crt"), "--ssl-certfile", str(pki / "server.crt"), "--ssl-keyfile", str(pki / "server.key"),
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        *([] if in_memory else ["--database", str(state_dir / "superlink.db")]), "--host", host, "--port", str(port),
    ]


def supernode_command(site: SiteSettings) -> list[str]:
    """The SuperNode for one site: the CA, its own key, its node config, and (runtime "fedmm") process isolation."""
    if site.runtime == "flower":
        command = [str(Path(sys.executable).parent / "flower-supernode")]
    else:
        command = [sys.executable, "-m", "fedmm.runtime.supernode", "--isolation", "process",
                   "--superexec-auth-secret-file", str(site.state_dir / SECRET_FILE)]
    return command + [
        "--superlink", site.superlink, "--root-certificates", str(site.ca), "--auth-supernode-private-key", str(site.key),
        "--node-config", site.node_config(), "--port", str(site.clientapp_port),
    ]


def executor_command(site: SiteSettings) -> list[str]:
    """The site's long-lived ClientApp executor (:mod:`fedmm.runtime.executor`), for runtime "fedmm"."""
    return [
        sys.executable, "-m", "fedmm.runtime.executor", "--runtime-api-address", f"127.0.0.1:{site.clientapp_port}",
        "--secret-file", str(site.state_dir / SECRET_FILE),
    ]


def run_server(pki: Path, state_dir: Path, *, host: str, port: int, in_memory: bool = False) -> int:
    """Run the SuperLink until it ends or is told to stop."""
    from fedmm.secure.certs import problems

    # An expired, missing or mis-signed certificate started a SuperLink whose SuperExec then failed, half alive.
    trouble = {name: why for name, why in problems(pki).items() if name in ("ca.crt", "server.crt", "server.key")}
    if trouble:
        raise ConfigError("--pki", "cannot serve TLS: " + "; ".join(f"{name} {why}" for name, why in sorted(trouble.items())), value=str(pki),
                          fix=f"make new server certificates (`fedmm certs init`, see docs/transport.md); `fedmm certs show {pki}` lists what is wrong")
    state_dir.mkdir(parents=True, exist_ok=True)
    command = server_command(pki, state_dir, host=host, port=port, in_memory=in_memory)
    print("[fedmm] " + " ".join(command), flush=True)
    # The ServerApp (started by this SuperLink) checks each reply's claim to a site name against the enrolled keys.
    env = {**flower_env(), KEYS_ENV: str((pki / "sites").resolve())}
    if not in_memory:  # the ServerApp names a node by the enrolled key it registered with (fedmm.federation.presence)
        env[DATABASE_ENV] = str((state_dir / "superlink.db").resolve())
    return supervise([("flower-superlink", spawn(command, env=env))])


def run_site(site: SiteSettings) -> int:
    """Run a site: its SuperNode and (runtime "fedmm") its ClientApp executor, until either ends or a signal arrives."""
    from fedmm.privacy.ledger import PrivacyLedger

    site.state_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:  # the SuperNode's local port: taken when this site (or another) already runs here
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT by a site just stopped is free
        try:
            probe.bind(("127.0.0.1", site.clientapp_port))
        except OSError:
            raise ConfigError("clientapp-port", f"127.0.0.1:{site.clientapp_port} is in use: is site {site.name} (or another site) already running "
                              "on this machine?", value=site.clientapp_port, fix="stop the running `fedmm site`, or give each site on one machine "
                              "its own clientapp-port in its site file") from None
    # The site's ledger must be there (made once with `fedmm ledger init`), intact and not in use by another site process.
    PrivacyLedger.open(site.state_dir / "ledger.sqlite", site=site.name, wait=0.0).close()
    _check_server(site)
    env = flower_env()
    processes: list[tuple[str, subprocess.Popen[bytes]]] = []
    if site.runtime == "fedmm":
        make_secret(site.state_dir)
        env[POLL_ENV] = str(site.poll_interval)
        env[HEARTBEAT_ENV] = str(site.heartbeat_interval)
    command = supernode_command(site)
    print(f"[fedmm] site {site.name}: " + " ".join(command), flush=True)
    processes.append(("flower-supernode", spawn(command, env=env)))
    if site.runtime == "fedmm":
        command = executor_command(site)
        print(f"[fedmm] site {site.name}: " + " ".join(command), flush=True)
        processes.append(("ClientApp executor", spawn(command, env=env)))
    return supervise(processes)


def _check_server(site: SiteSettings) -> None:
    """Refuse to start a site whose server fails TLS verification (Flower's SuperNode retries that for ever);
    a server that does not answer yet only gets a note: the SuperNode keeps trying."""
    probe = probe_superlink(site.superlink, site.ca)
    if probe.verdict == "unreachable":
        print(f"[fedmm] site {site.name}: the server at {site.superlink} does not answer yet ({probe.detail}); the SuperNode keeps trying", flush=True)
        return
    if probe.verdict == "untrusted":
        raise ConfigError("site.ca", f"the server at {site.superlink} is not verified by {site.ca}: {probe.detail}", value=str(site.ca),
                          fix="use the ca.crt of the federation's `fedmm certs init` folder (from the server operator), and an address "
                          "the server's certificate names (`fedmm certs show` lists them; the operator adds one with `fedmm certs server PKI --san ...`)")
    if probe.verdict == "refused":
        raise ConfigError("site.superlink", f"{site.superlink}: {probe.detail}", value=site.superlink,
                          fix="point superlink at the `fedmm server` of the federation itself, not at a proxy that asks for client certificates")
    if probe.verdict == "bad-ca":
        raise ConfigError("site.ca", probe.detail, value=str(site.ca), fix="use the ca.crt of the federation's `fedmm certs init` folder")
    if probe.verdict != "ok":  # not-tls, bad-address
        raise ConfigError("site.superlink", f"no TLS handshake with {site.superlink}: {probe.detail}", value=site.superlink,
                          fix="point superlink at the `fedmm server` of the federation (its port, 9092 by default)")


def write_connection(flwr_home: Path, name: str, address: str, ca: Path) -> Path:
    """Add a TLS connection for ``flwr`` (runs, ``flwr ls``, registering sites) to ``$FLWR_HOME/config.toml``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    text = path.read_text() if path.exists() else ""
    if f"[superlink.{name}]" not in text:
        if "[superlink]" not in text:
            text += f'\n[superlink]\ndefault = "{name}"\n'
        text += f'\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca.resolve()}"\n'
        path.write_text(text)
    return path

