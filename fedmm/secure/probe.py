"""Before a site starts: does the server it names prove itself with the CA the site holds?

Flower's SuperNode retries a failed TLS handshake for ever, so a site given the wrong CA
file, an address the server's certificate does not name, or a file that is not a
certificate at all looked started and never joined. :func:`check_site_keys` and
:func:`probe_superlink` say which, before any process starts; a server that does not answer
yet is not an error (sites may start first), only a note.

    >>> probe_superlink("127.0.0.1:1", Path(__file__)).verdict  # this file is no certificate
    'bad-ca'
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

__all__ = ["Probe", "check_site_keys", "probe_superlink", "split_address"]


@dataclass(frozen=True)
class Probe:
    """``verdict``: "ok", "unreachable" (nothing answered: not an error), "bad-address" (not
    ``host:port``), "bad-ca" (the CA file cannot be read as certificates), "untrusted" (the
    server's certificate does not verify against the CA, or does not name the address),
    "refused" (the server ended the handshake) or "not-tls"; ``detail`` says why."""

    verdict: str
    detail: str = ""


def split_address(address: str) -> tuple[str, int]:
    """``("host", port)`` as Flower's SuperNode reads ``--superlink`` (its own ``parse_address``); ValueError otherwise."""
    from flwr.supercore.address import parse_address

    parsed = parse_address(address)
    if parsed is None or not 0 < parsed[1] < 65536:
        raise ValueError(f"not host:port: {address!r}")
    return parsed[0], parsed[1]


def check_site_keys(ca: Path, key: Path) -> dict[str, str]:
    """Which of a site's two files is not what it should be: ``{"ca": why, "key": why}``."""
    wrong = {}
    try:
        certificates = x509.load_pem_x509_certificates(ca.read_bytes())
        if not certificates:
            wrong["ca"] = "holds no certificate"
    except (OSError, ValueError) as err:
        wrong["ca"] = f"is not a PEM certificate ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    try:
        private = load_ssh_private_key(key.read_bytes(), password=None)  # as flower-supernode loads it
        if not isinstance(private, ec.EllipticCurvePrivateKey):  # Flower's SuperNode authentication takes no other
            wrong["key"] = f"is a {type(private).__name__.removeprefix('_')} key; SuperNode authentication needs an ECDSA key (`fedmm certs site` makes one)"
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        wrong["key"] = f"is not an unencrypted OpenSSH private key ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return wrong


def probe_superlink(address: str, ca: Path, *, timeout: float = 5.0) -> Probe:
    """One TLS handshake with ``address``, trusting only ``ca`` and checking that the server's
    certificate names the host, as the SuperNode's gRPC channel does."""
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError, ValueError) as err:
        return Probe("bad-ca", f"{ca} cannot be read as CA certificates ({err})")
    context.set_alpn_protocols(["h2"])  # what gRPC offers
    try:
        host, port = split_address(address)
    except ValueError as err:
        return Probe("bad-address", str(err))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw, server_hostname=host):
            return Probe("ok")
    except ssl.SSLCertVerificationError as err:
        return Probe("untrusted", err.verify_message or str(err))
    except ssl.SSLError as err:
        if "ALERT" in str(err.reason or ""):  # the server spoke TLS and ended the handshake itself
            return Probe("refused", f"the server ended the TLS handshake ({err.reason}); a server that asks for a client certificate does this")
        return Probe("not-tls", err.reason or str(err))
    except OSError as err:  # refused, no route, timeout, name not found: the server may not be up yet
        return Probe("unreachable", err.strerror or str(err) or type(err).__name__)
