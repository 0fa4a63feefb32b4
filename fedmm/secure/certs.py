"""A private CA, the SuperLink's TLS certificate and the sites' SuperNode keys.

Every key is ECDSA on NIST P-384 (the curve Flower documents for SuperNode keys;
certificates are signed with SHA-384). An output folder holds::

    ca.crt  ca.key            private CA (CA:true, keyCertSign/cRLSign), default 1825 days
    server.crt  server.key    SuperLink certificate (serverAuth, SANs as asked), default 365 days
    sites/<name>.key          a site's SuperNode key: OpenSSH private key, unencrypted
    sites/<name>.pub          its public key: one OpenSSH line, for `flwr supernode register`
    certs.json                manifest: every file, purpose, algorithm, SANs, expiry, SHA-256

Private keys are written with mode 0600 and never replaced unless ``force=True``.
Flower has no mutual TLS: a site proves who it is with its registered SuperNode key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmm.errors import ConfigError

__all__ = [
    "CA_CERT", "CA_KEY", "SERVER_CERT", "SERVER_KEY", "SITES_DIR", "MANIFEST", "KEY_ALGORITHM",
    "DEFAULT_SANS", "DEFAULT_DAYS", "DEFAULT_CA_DAYS",
    "create_ca", "create_server_certificate", "init_certificates", "create_site_keys",
    "describe", "write_manifest", "problems", "parse_sans",
]

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
SITES_DIR, MANIFEST = "sites", "certs.json"
KEY_ALGORITHM = "ECDSA P-384"
DEFAULT_SANS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
DEFAULT_CA_DAYS = 1825

_CURVE = ec.SECP384R1
_HASH = hashes.SHA384
_SKEW = dt.timedelta(minutes=5)  # not-before is back-dated: clocks differ between hosts
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PURPOSES = {
    CA_CERT: "CA certificate: give to the SuperLink (--ssl-ca-certfile), every site (--root-certificates) and flwr (root-certificates)",
    CA_KEY: "CA private key: signs server certificates; keep it offline, on no server or site",
    SERVER_CERT: "SuperLink TLS certificate (--ssl-certfile)",
    SERVER_KEY: "SuperLink TLS private key (--ssl-keyfile); SuperLink host only",
}


# ----------------------------------------------------------------------------- validation


def parse_sans(sans: Sequence[str]) -> list[x509.GeneralName]:
    """Turn host names and IP addresses into subjectAltName entries.

    >>> [type(n).__name__ for n in parse_sans(["localhost", "127.0.0.1", "::1"])]
    ['DNSName', 'IPAddress', 'IPAddress']
    """
    names: list[x509.GeneralName] = []
    for raw in sans:
        san = raw.strip()
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
            continue
        except ValueError:
            pass
        labels = san.removeprefix("*.").rstrip(".").split(".")
        if (not san or len(san) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels)
                or all(label.isdigit() for label in labels)):
            raise ConfigError("san", "is neither an IP address nor a DNS name", value=raw,
                              fix="give the host name or address sites dial, e.g. --san superlink.example.org --san 10.0.0.5")
        names.append(x509.DNSName(san))
    if not names:
        raise ConfigError("san", "no subject alternative name given", value=list(sans),
                          fix="give at least one, e.g. --san localhost --san 127.0.0.1")
    return names


def _check_days(days: int, key: str = "days") -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise ConfigError(key, "validity must be a positive whole number of days", value=days, fix=f"e.g. --{key} {DEFAULT_DAYS}")


def _check_site_names(names: Sequence[str]) -> None:
    if not names:
        raise ConfigError("site", "no site name given", value=list(names), fix="name at least one site, e.g. hospital-a")
    for name in names:
        if not _SITE_NAME.fullmatch(name):
            raise ConfigError("site", "a site name must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit (no paths)",
                              value=name, fix="use a plain name such as hospital-a")
    if len(set(names)) != len(names):
        raise ConfigError("site", "a site is named twice", value=list(names), fix="name each site once")


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists():
            raise ConfigError("force", f"{path} already exists; refusing to overwrite it", value=str(path),
                              fix="keep it, choose another folder, or pass --force (force=True) to replace it "
                                  "(whoever holds the old file then needs the new one)")


# ----------------------------------------------------------------------------- writing


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically; a private file is 0600 from the moment it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if not private:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_ca(outdir: Path, *, days: int = DEFAULT_CA_DAYS, common_name: str = "fedmm private CA",
              force: bool = False) -> tuple[Path, Path]:
    """Create a private CA: an ECDSA P-384 key and a self-signed certificate.

    Parameters
    ----------
    outdir : Path
        Folder for ``ca.crt`` and ``ca.key`` (created if missing).
    days : int
        Validity of the CA certificate from now.
    common_name : str
        The CA's subject CN.
    force : bool
        Replace an existing ``ca.crt``/``ca.key``.

    Returns
    -------
    tuple[Path, Path]
        The certificate and the key.
    """
    _check_days(days, "ca-days")
    cert_path, key_path = Path(outdir) / CA_CERT, Path(outdir) / CA_KEY
    _refuse_existing([key_path, cert_path], force)
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmm"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _SKEW).not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, _HASH())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, _pem_cert(cert), private=False)
    return cert_path, key_path


def _load_ca(outdir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = outdir / CA_CERT, outdir / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise ConfigError("OUTDIR", f"no CA: {path} is missing", value=str(path), fix=f"run `fedmm certs init {outdir}` first")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("OUTDIR", f"{key_path} is not an EC private key", value=type(key).__name__, fix="recreate the CA with `fedmm certs init --force`")
    return x509.load_pem_x509_certificate(cert_path.read_bytes()), key


def create_server_certificate(outdir: Path, *, sans: Sequence[str] = DEFAULT_SANS, days: int = DEFAULT_DAYS,
                              force: bool = False) -> tuple[Path, Path]:
    """Create the SuperLink's TLS key and certificate, signed by the CA in ``outdir``.

    Parameters
    ----------
    outdir : Path
        Folder holding ``ca.crt``/``ca.key``; ``server.crt``/``server.key`` go there.
    sans : Sequence[str]
        DNS names and IP addresses sites use to reach the SuperLink.
    days : int
        Validity from now; it may not outlast the CA.
    force : bool
        Replace an existing ``server.crt``/``server.key``.

    Returns
    -------
    tuple[Path, Path]
        The certificate and the key.
    """
    outdir = Path(outdir)
    names = parse_sans(sans)
    _check_days(days)
    cert_path, key_path = outdir / SERVER_CERT, outdir / SERVER_KEY
    _refuse_existing([key_path, cert_path], force)
    ca_cert, ca_key = _load_ca(outdir)
    not_after = _now() + dt.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        raise ConfigError("days", f"the server certificate would outlive the CA, which expires {ca_cert.not_valid_after_utc:%Y-%m-%d}",
                          value=days, fix="ask for fewer days, or make a new CA with a longer --ca-days")
    key = ec.generate_private_key(_CURVE())
    first_dns = next((n.value for n in names if isinstance(n, x509.DNSName)), "fedmm superlink")
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmm"), x509.NameAttribute(NameOID.COMMON_NAME, first_dns)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _SKEW).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _HASH())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, _pem_cert(cert), private=False)
    return cert_path, key_path


def init_certificates(outdir: Path, *, sans: Sequence[str] = DEFAULT_SANS, days: int = DEFAULT_DAYS,
                      ca_days: int = DEFAULT_CA_DAYS, force: bool = False) -> list[Path]:
    """Create a CA and a server certificate in ``outdir`` and update ``certs.json``.

    Every input is checked, and every existing file refused, before anything is written.
    To renew only the server certificate with the same CA, use
    :func:`create_server_certificate` (``force=True``): sites keep their ``ca.crt``.

    Parameters
    ----------
    outdir : Path
        Output folder (created if missing).
    sans : Sequence[str]
        DNS names and IP addresses of the SuperLink, as sites dial it.
    days, ca_days : int
        Validity of the server and of the CA certificate, in days from now.
    force : bool
        Replace existing CA and server files (every site then needs the new ``ca.crt``).

    Returns
    -------
    list[Path]
        The files written.
    """
    outdir = Path(outdir)
    parse_sans(sans)
    _check_days(days)
    _check_days(ca_days, "ca-days")
    if days > ca_days:
        raise ConfigError("days", f"the server certificate would outlive the CA ({ca_days} days)", value=days,
                          fix=f"use --days {ca_days} or less, or a longer --ca-days")
    _refuse_existing([outdir / n for n in (CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT)], force)
    written = [*create_ca(outdir, days=ca_days, force=force), *create_server_certificate(outdir, sans=sans, days=days, force=force)]
    write_manifest(outdir)
    return written


def create_site_keys(outdir: Path, names: Sequence[str], *, force: bool = False) -> list[tuple[Path, Path]]:
    """Create SuperNode authentication key pairs for named sites and update ``certs.json``.

    The private key is an unencrypted OpenSSH EC key, as ``flower-supernode
    --auth-supernode-private-key`` loads it (``load_ssh_private_key(data, None)``);
    the public key is one OpenSSH line (``ecdsa-sha2-nistp384 AAAA... <name>``), as
    ``flwr supernode register`` loads it (``load_ssh_public_key``).

    Returns
    -------
    list[tuple[Path, Path]]
        ``(private key, public key)`` per site.
    """
    outdir = Path(outdir)
    names = list(names)
    _check_site_names(names)
    sites = outdir / SITES_DIR
    _refuse_existing([sites / f"{n}{ext}" for n in names for ext in (".key", ".pub")], force)
    pairs = []
    for name in names:
        key = ec.generate_private_key(_CURVE())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(sites / f"{name}.key", private, private=True)
        _write(sites / f"{name}.pub", public + f" {name}\n".encode(), private=False)
        pairs.append((sites / f"{name}.key", sites / f"{name}.pub"))
    write_manifest(outdir)
    return pairs


# ----------------------------------------------------------------------------- describing


def _cert_entry(path: Path) -> dict[str, Any]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    key = cert.public_key()
    try:
        sans = [str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "algorithm": f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__,
        "key_size": getattr(key, "key_size", None),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": sans,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    }


def _ssh_public_entry(path: Path) -> dict[str, Any]:
    text = path.read_text()
    key = serialization.load_ssh_public_key(text.encode())
    blob = base64.b64decode(text.split()[1])
    return {
        "algorithm": f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__,
        "key_size": getattr(key, "key_size", None),
        "sha256": "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("="),  # as ssh-keygen -l prints it
    }


def _private_entry(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    key = serialization.load_ssh_private_key(data, None) if b"OPENSSH" in data else serialization.load_pem_private_key(data, None)
    return {
        "algorithm": f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__,
        "key_size": getattr(key, "key_size", None),
    }


def _files(outdir: Path) -> list[tuple[str, str, str]]:
    """``(relative path, purpose, kind)`` of every file fedmm certs manages that is present."""
    found = [(name, _PURPOSES[name], "cert" if name.endswith(".crt") else "key") for name in _PURPOSES if (outdir / name).is_file()]
    sites = outdir / SITES_DIR
    for path in sorted(sites.glob("*.key")) + sorted(sites.glob("*.pub")):
        rel, site = f"{SITES_DIR}/{path.name}", path.stem
        if path.suffix == ".key":
            found.append((rel, f"site {site}: SuperNode private key (--auth-supernode-private-key); site {site} only", "key"))
        else:
            found.append((rel, f"site {site}: SuperNode public key; the operator registers it with `flwr supernode register`", "pub"))
    return found


def describe(outdir: Path) -> list[dict[str, Any]]:
    """Describe every certificate and key present in ``outdir``.

    Returns
    -------
    list[dict[str, Any]]
        One entry a file: ``file`` (relative), ``purpose``, ``mode`` and, as they apply,
        ``algorithm``, ``key_size``, ``sans``, ``not_after`` and a SHA-256 ``sha256``.
    """
    outdir = Path(outdir)
    entries = []
    for rel, purpose, kind in _files(outdir):
        path = outdir / rel
        entry: dict[str, Any] = {"file": rel, "purpose": purpose, "mode": f"{path.stat().st_mode & 0o777:04o}"}
        if kind == "cert":
            entry |= _cert_entry(path)
        elif kind == "pub":
            entry |= _ssh_public_entry(path)
        else:
            entry |= _private_entry(path)
        entries.append(entry)
    return entries


def write_manifest(outdir: Path) -> Path:
    """Write ``certs.json``: what is in ``outdir``, what each file is for, and when it expires."""
    outdir = Path(outdir)
    manifest = {
        "generated": _now().isoformat(timespec="seconds"),
        "key_algorithm": KEY_ALGORITHM,
        "signature_hash": "SHA-384",
        "files": describe(outdir),
    }
    path = outdir / MANIFEST
    _write(path, (json.dumps(manifest, indent=2) + "\n").encode(), private=False)
    return path


def problems(outdir: Path, *, now: dt.datetime | None = None) -> dict[str, str]:
    """What is wrong in ``outdir``: ``{relative file: problem}``, empty when all is well.

    A file is a problem when it is missing (one of the CA and server files, or listed in
    ``certs.json``), a certificate has expired, ``server.crt`` is not signed by
    ``ca.crt``, or a private key is readable by others than its owner.
    """
    outdir, now = Path(outdir), now or _now()
    present = {e["file"]: e for e in describe(outdir)}
    expected = set(_PURPOSES)
    if (outdir / MANIFEST).is_file():
        expected |= {f["file"] for f in json.loads((outdir / MANIFEST).read_text()).get("files", [])}
    found = {name: "missing" for name in sorted(expected - set(present))}
    for name, entry in present.items():
        if "not_after" in entry and dt.datetime.fromisoformat(entry["not_after"]) <= now:
            found[name] = f"expired {entry['not_after'][:10]}"
        elif name.endswith(".key") and int(entry["mode"], 8) & 0o077:
            found[name] = f"mode {entry['mode']}: readable by others (chmod 600 {outdir / name})"
    if SERVER_CERT in present and CA_CERT in present and SERVER_CERT not in found:
        server = x509.load_pem_x509_certificate((outdir / SERVER_CERT).read_bytes())
        try:
            server.verify_directly_issued_by(x509.load_pem_x509_certificate((outdir / CA_CERT).read_bytes()))
        except (ValueError, TypeError, InvalidSignature):
            found[SERVER_CERT] = "not signed by ca.crt"
    return found
