"""`fedmm site` refuses what Flower's SuperNode would retry for ever, before it starts anything.

Operator findings: a site given a CA file that was not a certificate, the CA of another
federation, or an address the server's certificate does not name, looked started and never
joined (the SuperNode retries a failed TLS handshake without end). Each is now a ConfigError
naming the key, the file and a fix; a server that does not answer yet is only a note.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmm.errors import ConfigError
from fedmm.privacy.ledger import PrivacyLedger
from fedmm.runtime import deploy
from fedmm.runtime.loopback import free_port
from fedmm.secure.certs import create_site_keys, init_certificates
from fedmm.secure.probe import Probe, probe_superlink


def _pki(root: Path, *sans: str) -> Path:
    init_certificates(root, **({"sans": list(sans)} if sans else {}))
    create_site_keys(root, ["george"])
    return root


def _site(tmp_path: Path, ca: Path, superlink: str, *, key: Path | None = None) -> Path:
    shutil.copy(ca, tmp_path / "ca.crt")
    shutil.copy(key or tmp_path / "own" / "sites" / "george.key", tmp_path / "george.key")
    path = tmp_path / "george.toml"
    path.write_text(f'[site]\nname = "george"\nsuperlink = "{superlink}"\nca = "ca.crt"\nkey = "george.key"\nstate-dir = "state"\nepsilon-budget = 8.0\n')
    return path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TLS server on loopback presenting the certificate of ``tmp_path/"own"`` (names: localhost, 127.0.0.1)."""
    pki = _pki(tmp_path / "own")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}", pki
    stop.set()
    thread.join(5)
    listener.close()


def _refused_before_starting(monkeypatch: pytest.MonkeyPatch, site_file: Path, match: str) -> None:
    site = deploy.SiteSettings.load(site_file)
    PrivacyLedger.create(site.state_dir / "ledger.sqlite", site="george").close()
    monkeypatch.setattr(deploy, "spawn", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ConfigError, match=match):
        deploy.run_site(site)


def test_a_ca_or_key_file_that_is_not_one_is_refused_when_the_site_file_is_read(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "own")
    bad_ca = tmp_path / "not-a-cert.pem"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"site\.ca.*is not a PEM certificate"):
        deploy.SiteSettings.load(_site(tmp_path, bad_ca, "127.0.0.1:9092"))
    # the site's public key where its private key belongs (an easy slip: george.pub beside george.key)
    with pytest.raises(ConfigError, match=r"site\.key.*is not an unencrypted OpenSSH private key"):
        deploy.SiteSettings.load(_site(tmp_path, pki / "ca.crt", "127.0.0.1:9092", key=pki / "sites" / "george.pub"))
    assert deploy.SiteSettings.load(_site(tmp_path, pki / "ca.crt", "127.0.0.1:9092")).name == "george"


def test_a_server_another_ca_signed_is_refused_before_the_site_starts(tmp_path: Path, tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    address, _ = tls_server
    other = _pki(tmp_path / "other-federation")
    _refused_before_starting(monkeypatch, _site(tmp_path, other / "ca.crt", address), r"site\.ca.*is not verified by .*ca\.crt: .*certificate.*Fix: use the ca\.crt")


def test_an_address_the_servers_certificate_does_not_name_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = _pki(tmp_path / "own", "fl.example.org")  # a certificate for a DNS name only; the site dials the IP address
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    probe = _probe_one_handshake(context, pki / "ca.crt")
    assert probe.verdict == "untrusted" and "mismatch" in probe.detail, probe


def _probe_one_handshake(context: ssl.SSLContext, ca: Path) -> Probe:
    """The site's probe against a loopback server that takes one handshake with ``context``."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accept = threading.Thread(target=lambda: _handshake_once(listener, context), daemon=True)
        accept.start()
        probe = probe_superlink(f"127.0.0.1:{listener.getsockname()[1]}", ca)
        accept.join(5)
    return probe


def _handshake_once(listener: socket.socket, context: ssl.SSLContext) -> None:
    conn, _ = listener.accept()
    try:
        with context.wrap_socket(conn, server_side=True):
            pass
    except (ssl.SSLError, OSError):
        pass


def test_the_right_ca_passes_and_a_server_not_up_yet_is_only_a_note(tmp_path: Path, tls_server: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    address, pki = tls_server
    assert probe_superlink(address, pki / "ca.crt").verdict == "ok"
    assert probe_superlink(address.replace("127.0.0.1", "localhost"), pki / "ca.crt").verdict == "ok"
    down = deploy.SiteSettings.load(_site(tmp_path, pki / "ca.crt", f"127.0.0.1:{free_port()}"))
    deploy._check_server(down)  # no error: sites may start before their server
    assert "does not answer yet" in capsys.readouterr().out


def test_a_server_that_does_not_speak_tls_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = _pki(tmp_path / "own")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        site_file = _site(tmp_path, pki / "ca.crt", f"127.0.0.1:{listener.getsockname()[1]}")
        _refused_before_starting(monkeypatch, site_file, r"site\.superlink.*no TLS handshake with 127\.0\.0\.1:\d+")
        thread.join(5)


def test_a_superlink_without_a_port_and_a_key_flower_cannot_use_are_refused(tmp_path: Path) -> None:
    """Review findings: `superlink = "fl.example.org"` was called "does not answer yet" (Flower's SuperNode exits on
    it); an Ed25519 key passed the key check (Flower's SuperNode authentication takes ECDSA only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pki = _pki(tmp_path / "own")
    with pytest.raises(ConfigError, match=r"site\.superlink.*must be the server's host:port"):
        deploy.SiteSettings.load(_site(tmp_path, pki / "ca.crt", "fl.example.org"))
    ed = tmp_path / "ed.key"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match=r"site\.key.*needs an ECDSA key"):
        deploy.SiteSettings.load(_site(tmp_path, pki / "ca.crt", "127.0.0.1:9092", key=ed))


def test_certs_server_renews_the_servers_certificate_from_the_same_ca(tmp_path: Path) -> None:
    """The fix the pre-flight gives for an address the certificate does not name: a new server certificate, same CA."""
    from cryptography import x509
    from typer.testing import CliRunner

    from fedmm.cli import app

    pki = _pki(tmp_path / "own")
    ca_before = (pki / "ca.crt").read_bytes()
    done = CliRunner().invoke(app, ["certs", "server", str(pki), "--san", "fl.example.org", "--san", "127.0.0.1"])
    assert done.exit_code == 0, done.output
    assert (pki / "ca.crt").read_bytes() == ca_before  # every site's ca.crt stays valid
    names = x509.load_pem_x509_certificate((pki / "server.crt").read_bytes()).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert CliRunner().invoke(app, ["certs", "show", str(pki)]).exit_code == 0  # the manifest and the chain agree


def test_a_server_asking_for_a_client_certificate_is_named_as_such(tmp_path: Path) -> None:
    """Review finding: a TLS 1.2 server requiring client certificates (a proxy; Flower's SuperLink never does) was "not TLS"."""
    pki = _pki(tmp_path / "own")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(pki / "ca.crt")
    probe = _probe_one_handshake(context, pki / "ca.crt")
    assert probe.verdict == "refused" and "client certificate" in probe.detail, probe
