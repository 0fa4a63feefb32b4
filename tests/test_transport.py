"""Encrypted transport and authenticated sites: `fedmm certs` and a real TLS + auth loopback.

The loopback test (``-k loopback``) starts a real ``flower-superlink`` with TLS and
SuperNode authentication on 127.0.0.1, registers one site's key and starts three
``flower-supernode`` processes: the registered site joins, an unregistered key is refused,
and a site without the CA cannot complete the TLS handshake.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from fedmm.cli import app
from fedmm.errors import ConfigError
from fedmm.secure import certs

BIN = Path(sys.executable).parent
WIDE = {"COLUMNS": "240"}


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ----------------------------------------------------------------------------- certificates


def test_server_certificate_chains_to_the_ca_with_the_sans_and_expiry_asked(tmp_path: Path) -> None:
    before = dt.datetime.now(dt.timezone.utc)
    certs.init_certificates(tmp_path, sans=["localhost", "127.0.0.1", "fl.example.org", "::1"], days=30, ca_days=60)

    ca, server = _cert(tmp_path / "ca.crt"), _cert(tmp_path / "server.crt")
    server.verify_directly_issued_by(ca)  # raises unless ca.key signed it
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert abs(server.not_valid_after_utc - (before + dt.timedelta(days=30))) < dt.timedelta(minutes=1)
    assert abs(ca.not_valid_after_utc - (before + dt.timedelta(days=60))) < dt.timedelta(minutes=1)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    for cert in (ca, server):
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert certs.problems(tmp_path) == {}


def test_site_keys_load_exactly_as_flower_loads_them(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    [(key_path, pub_path)] = certs.create_site_keys(tmp_path, ["hospital-a"])

    private = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    public = serialization.load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key() == public
    # flower-supernode --auth-supernode-private-key and flwr supernode register, verbatim
    args = argparse.Namespace(auth_supernode_private_key=str(key_path), auth_supernode_public_key=None)
    keys = _try_setup_client_authentication(args)
    assert keys is not None and keys[1] == public
    assert try_load_public_key(pub_path) == public_key_to_bytes(public)


def test_private_keys_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        certs.init_certificates(tmp_path)
        certs.create_site_keys(tmp_path, ["a", "b"])
    finally:
        os.umask(old)

    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert {f for f, m in modes.items() if m == 0o600} == {"ca.key", "server.key", "sites/a.key", "sites/b.key"}
    assert all(m == 0o644 for f, m in modes.items() if not f.endswith(".key"))


def test_existing_keys_are_never_overwritten_without_force(tmp_path: Path) -> None:
    certs.init_certificates(tmp_path)
    certs.create_site_keys(tmp_path, ["a"])
    ca_key, site_key = (tmp_path / "ca.key").read_bytes(), (tmp_path / "sites/a.key").read_bytes()

    with pytest.raises(ConfigError, match=r"ca\.key already exists.*--force"):
        certs.init_certificates(tmp_path)
    with pytest.raises(ConfigError, match=r"sites/a\.key already exists.*--force"):
        certs.create_site_keys(tmp_path, ["b", "a"])
    assert (tmp_path / "ca.key").read_bytes() == ca_key and (tmp_path / "sites/a.key").read_bytes() == site_key
    assert not (tmp_path / "sites/b.key").exists()  # refused before anything was written

    certs.init_certificates(tmp_path, force=True)
    certs.create_site_keys(tmp_path, ["a"], force=True)
    assert (tmp_path / "ca.key").read_bytes() != ca_key and (tmp_path / "sites/a.key").read_bytes() != site_key


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"sans": ["bad host"]}, "san"),
        ({"sans": ["https://fl.example.org"]}, "san"),
        ({"sans": ["fl.example.org:9092"]}, "san"),
        ({"sans": ["10.0.0.300"]}, "san"),
        ({"sans": []}, "san"),
        ({"days": 0}, "days"),
        ({"days": -5}, "days"),
        ({"days": 400, "ca_days": 365}, "days"),
        ({"ca_days": 0}, "ca-days"),
    ],
)
def test_bad_certificate_inputs_are_config_errors(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        certs.init_certificates(tmp_path, **kwargs)

    assert err.value.key == key and "Fix:" in str(err.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("names", [[""], ["../evil"], ["a/b"], [".hidden"], ["x" * 64], ["a", "a"], []])
def test_bad_site_names_are_config_errors(tmp_path: Path, names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        certs.create_site_keys(tmp_path, names)

    assert err.value.key == "site" and "Fix:" in str(err.value)
    assert not (tmp_path / "sites").exists()


def test_manifest_lists_every_file_with_purpose_expiry_and_fingerprint(tmp_path: Path) -> None:
    certs.init_certificates(tmp_path, sans=["fl.example.org", "10.1.2.3"])
    certs.create_site_keys(tmp_path, ["a"])

    manifest = json.loads((tmp_path / "certs.json").read_text())
    files = {f["file"]: f for f in manifest["files"]}
    assert set(files) == {"ca.crt", "ca.key", "server.crt", "server.key", "sites/a.key", "sites/a.pub"}
    assert all(f["purpose"] and f["algorithm"] == "ECDSA secp384r1" and f["key_size"] == 384 for f in files.values())
    server = files["server.crt"]
    assert server["sans"] == ["fl.example.org", "10.1.2.3"]
    assert server["not_after"] == _cert(tmp_path / "server.crt").not_valid_after_utc.isoformat()
    assert server["sha256"] == _cert(tmp_path / "server.crt").fingerprint(hashes.SHA256()).hex(":").upper()
    assert files["sites/a.pub"]["sha256"].startswith("SHA256:")
    assert files["ca.key"]["mode"] == "0600"


# ----------------------------------------------------------------------------- CLI


def test_cli_exit_codes(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    run = CliRunner().invoke

    made = run(app, ["certs", "init", str(out), "--san", "localhost", "--san", "127.0.0.1", "--days", "90"], env=WIDE)
    sites = run(app, ["certs", "site", str(out), "alpha", "beta"], env=WIDE)
    shown = run(app, ["certs", "show", str(out)], env=WIDE)
    again = run(app, ["certs", "init", str(out)], env=WIDE)
    bad_san = run(app, ["certs", "init", str(tmp_path / "x"), "--san", "not a host"], env=WIDE)
    bad_days = run(app, ["certs", "init", str(tmp_path / "y"), "--days", "0"], env=WIDE)
    bad_site = run(app, ["certs", "site", str(out), "../alpha"], env=WIDE)

    assert made.exit_code == 0, made.output
    assert "server.crt, server.key, ca.crt" in made.output and "--enable-supernode-auth" in made.output
    assert sites.exit_code == 0, sites.output
    assert "flwr supernode register" in sites.output and "alpha.key" in sites.output
    assert shown.exit_code == 0, shown.output
    assert "server.crt" in shown.output and "sites/beta.pub" in shown.output and "localhost, 127.0.0.1" in shown.output
    assert again.exit_code == 2 and "--force" in again.output
    assert bad_san.exit_code == 2 and "not a host" in bad_san.output
    assert bad_days.exit_code == 2 and bad_site.exit_code == 2


def test_cli_show_exits_1_on_a_missing_or_expired_file(tmp_path: Path) -> None:
    certs.init_certificates(tmp_path)
    certs.create_site_keys(tmp_path, ["alpha"])
    (tmp_path / "sites/alpha.pub").unlink()
    missing = CliRunner().invoke(app, ["certs", "show", str(tmp_path)], env=WIDE)

    certs.create_site_keys(tmp_path, ["alpha"], force=True)
    _write_expired_server_certificate(tmp_path)
    expired = CliRunner().invoke(app, ["certs", "show", str(tmp_path)], env=WIDE)
    nothing = CliRunner().invoke(app, ["certs", "show", str(tmp_path / "nowhere")], env=WIDE)

    assert missing.exit_code == 1 and "sites/alpha.pub: missing" in missing.output
    assert expired.exit_code == 1 and "server.crt: expired" in expired.output
    assert nothing.exit_code == 1


def _write_expired_server_certificate(outdir: Path) -> None:
    ca = _cert(outdir / "ca.crt")
    ca_key = serialization.load_pem_private_key((outdir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
        .public_key(ec.generate_private_key(ec.SECP384R1()).public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=10)).not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA384())
    )
    (outdir / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# ----------------------------------------------------------------------------- loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries ``mark``: what this test started, and their children."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class _Processes:
    """Start Flower processes, each in its own session, and stop every one of them."""

    def __init__(self, root: Path, env: dict[str, str], mark: str) -> None:
        self.root, self.env, self.mark = root, env, mark
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, list[str]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.commands[name] = argv
        with (self.root / f"{name}.log").open("wb") as log:
            self.started[name] = subprocess.Popen(argv, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.started[name]

    def run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.started.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.started.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Flower detaches its SuperExec children into their own sessions: they carry our mark
        deadline = time.monotonic() + 10
        while (left := _marked_pids(self.mark)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait(predicate: Callable[[], bool], timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[_Processes]:
    if not (BIN / "flower-superlink").exists():
        pytest.skip(f"flower-superlink not found beside {sys.executable}")
    mark = f"FEDMM_TRANSPORT_TEST={uuid.uuid4().hex}"
    home = tmp_path / "home"
    (home / ".flwr").mkdir(parents=True)
    env = {
        **os.environ, "HOME": str(home), "FLWR_HOME": str(home / ".flwr"), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1", mark.split("=")[0]: mark.split("=")[1],
    }
    procs = _Processes(tmp_path, env, mark)
    try:
        yield procs
    finally:
        procs.stop_all()
        assert _marked_pids(mark) == [], "a Flower process started by the test is still running"


def test_loopback_tls_and_supernode_auth(tmp_path: Path, loopback: _Processes) -> None:
    """Real processes: TLS with our CA, SuperNode auth; registered joins, the others are refused."""
    pki = tmp_path / "pki"
    certs.init_certificates(pki)  # SANs localhost, 127.0.0.1
    certs.create_site_keys(pki, ["site-a", "site-b", "site-c"])
    port = _free_port()
    ca = pki / "ca.crt"
    (tmp_path / "home/.flwr/config.toml").write_text(
        f'[superlink]\ndefault = "fedmm"\n\n[superlink.fedmm]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )
    flwr = str(BIN / "flwr")

    superlink = loopback.start("superlink", [
        str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(pki / "server.crt"),
        "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(port),
    ])
    assert _wait(lambda: "Uvicorn running on https://" in loopback.log("superlink") or superlink.poll() is not None, 30)
    assert superlink.poll() is None, loopback.log("superlink")

    # (d) never --insecure, and the port serves our server certificate over TLS, verified with our CA
    assert "--insecure" not in Path(f"/proc/{superlink.pid}/cmdline").read_bytes().decode().split("\0")
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        served = tls.getpeercert(binary_form=True)
    assert served == _cert(pki / "server.crt").public_bytes(serialization.Encoding.DER)

    node_ids = {}
    for site in ("site-a", "site-c"):  # site-c is registered too: it can fail only on TLS
        done = loopback.run([flwr, "supernode", "register", str(pki / f"sites/{site}.pub"), "fedmm", "--format", "json"])
        reply = json.loads(done.stdout)
        assert done.returncode == 0 and reply["success"], done.stdout + done.stderr
        node_ids[site] = str(reply["node-id"])

    def supernode(name: str, *, root_certificates: bool = True) -> subprocess.Popen[bytes]:
        argv = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
                "--auth-supernode-private-key", str(pki / f"sites/{name}.key")]
        return loopback.start(name, argv + (["--root-certificates", str(ca)] if root_certificates else []))

    site_a, site_b, site_c = supernode("site-a"), supernode("site-b"), supernode("site-c", root_certificates=False)

    def statuses() -> dict[str, str]:
        done = loopback.run([flwr, "supernode", "ls", "fedmm", "--format", "json"])
        reply = json.loads(done.stdout)
        assert reply["success"], done.stdout + done.stderr
        return {n["node-id"]: n["status"] for n in reply["nodes"]}

    # (a) the registered site with the CA comes online
    assert _wait(lambda: statuses().get(node_ids["site-a"]) == "online", 30, step=1), loopback.log("site-a")
    assert site_a.poll() is None
    # (b) a valid but unregistered key is refused: Flower exit code 305 in its log (the OS
    # status is 1: flwr_exit maps every error code to 1), and the SuperLink says why
    assert _wait(lambda: site_b.poll() is not None, 30), loopback.log("site-b")
    assert site_b.returncode != 0 and "Exit Code: 305" in loopback.log("site-b"), loopback.log("site-b")
    assert "No SuperNode found with the given public key" in loopback.log("superlink")
    # (c) without our CA the site verifies against system roots and the handshake fails
    assert _wait(lambda: site_c.poll() is not None, 30), loopback.log("site-c")
    assert site_c.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in loopback.log("site-c"), loopback.log("site-c")
    final = statuses()
    assert final[node_ids["site-c"]] == "registered"  # never online
    assert final[node_ids["site-a"]] == "online" and len(final) == 2
    assert superlink.poll() is None
