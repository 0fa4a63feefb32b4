"""``fedmm certs``: make and inspect the TLS certificates and SuperNode keys of a deployment.

- ``fedmm certs init OUTDIR [--san HOST ...] [--days 365] [--ca-days 1825] [--force]``:
  a private CA and the SuperLink's certificate;
- ``fedmm certs server OUTDIR --san HOST ... [--days 365]``: a new SuperLink certificate from the
  same CA (another address, or a renewal): the sites' ``ca.crt`` stays valid;
- ``fedmm certs site OUTDIR NAME [NAME ...] [--force]``: SuperNode key pairs for sites;
- ``fedmm certs show OUTDIR``: what is there, expiry, fingerprints (exit 1 if anything is
  missing, expired, mis-signed or a private key is readable by others).

Exit codes: 0 success, 1 a problem found by ``show``, 2 bad input or a file that exists.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedmm.errors import ConfigError, FedMMError
from fedmm.secure import certs

__all__ = ["certs_app"]

certs_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Make and inspect TLS certificates and SuperNode authentication keys.")
console = Console(emoji=False)  # a fingerprint "0A:AB:54" is data, never an emoji code


@contextlib.contextmanager
def _exit_on_error() -> Iterator[None]:
    """Print a fedmm error and exit: 2 for configuration, 1 for anything else."""
    try:
        yield
    except ConfigError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        raise typer.Exit(2) from err
    except FedMMError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from err


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@certs_app.command("init")
def init(
    outdir: Annotated[Path, typer.Argument(help="folder for the CA and server files (created if missing)")],
    san: Annotated[list[str] | None, typer.Option("--san", help="DNS name or IP address sites dial; repeat it (default: localhost, 127.0.0.1)")] = None,
    days: Annotated[int, typer.Option("--days", help="validity of the server certificate")] = certs.DEFAULT_DAYS,
    ca_days: Annotated[int, typer.Option("--ca-days", help="validity of the CA certificate")] = certs.DEFAULT_CA_DAYS,
    force: Annotated[bool, typer.Option("--force", help="replace existing CA and server files")] = False,
) -> None:
    """Create a private CA (ECDSA P-384) and the SuperLink's TLS certificate signed by it."""
    sans = san or list(certs.DEFAULT_SANS)
    with _exit_on_error():
        certs.init_certificates(outdir, sans=sans, days=days, ca_days=ca_days, force=force)
    d = outdir.resolve()
    _say(f"wrote {d}: {certs.CA_CERT}, {certs.CA_KEY} ({ca_days} days), {certs.SERVER_CERT}, {certs.SERVER_KEY} "
         f"({days} days, SANs {', '.join(sans)}), {certs.MANIFEST}; keys are {certs.KEY_ALGORITHM}, mode 0600")
    _say("next steps:\n"
         f"  1. SuperLink host gets {certs.SERVER_CERT}, {certs.SERVER_KEY}, {certs.CA_CERT}:\n"
         f"     flower-superlink --ssl-ca-certfile {d / certs.CA_CERT} --ssl-certfile {d / certs.SERVER_CERT} "
         f"--ssl-keyfile {d / certs.SERVER_KEY} --enable-supernode-auth --disable-runtime-dependency-installation\n"
         f"  2. every site gets {certs.CA_CERT} (flower-supernode --root-certificates ca.crt)\n"
         f"  3. keep {certs.CA_KEY} offline: it is needed only to sign a new server certificate\n"
         f"  4. make each site's key: fedmm certs site {outdir} NAME ...")


@certs_app.command("server")
def server(
    outdir: Annotated[Path, typer.Argument(help="the folder of `fedmm certs init` (its ca.crt and ca.key sign the new certificate)")],
    san: Annotated[list[str] | None, typer.Option("--san", help="every DNS name or IP address sites dial; repeat it (default: localhost, 127.0.0.1)")] = None,
    days: Annotated[int, typer.Option("--days", help="validity of the server certificate")] = certs.DEFAULT_DAYS,
) -> None:
    """Replace the SuperLink's certificate with a new one from the same CA (a new address, or a renewal); sites keep their ca.crt."""
    sans = san or list(certs.DEFAULT_SANS)
    with _exit_on_error():
        certs.create_server_certificate(outdir, sans=sans, days=days, force=True)
        certs.write_manifest(outdir)
    _say(f"wrote {outdir.resolve()}: {certs.SERVER_CERT}, {certs.SERVER_KEY} ({days} days, SANs {', '.join(sans)}), signed by the same "
         f"{certs.CA_CERT}; restart `fedmm server` to serve it (the sites need nothing new)")


@certs_app.command("site")
def site(
    outdir: Annotated[Path, typer.Argument(help="the folder of `fedmm certs init`")],
    names: Annotated[list[str], typer.Argument(help="site names, e.g. hospital-a hospital-b")],
    force: Annotated[bool, typer.Option("--force", help="replace existing keys of these sites")] = False,
) -> None:
    """Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH format) for each site."""
    with _exit_on_error():
        pairs = certs.create_site_keys(outdir, names, force=force)
    d = outdir.resolve()
    for name, (key, pub) in zip(names, pairs):
        _say(f"site {name}: {key} (private, 0600), {pub}")
    _say("next steps:")
    for name, (key, pub) in zip(names, pairs):
        _say(f"  site {name} gets {certs.CA_CERT} and {key.name} only:\n"
             f"     flower-supernode --superlink HOST:PORT --root-certificates ca.crt --auth-supernode-private-key {key.name}\n"
             f"  the operator registers it (from a host that may reach the Control API):\n"
             f"     flwr supernode register {pub} CONNECTION")
    if not (d / certs.CA_CERT).is_file():
        _say(f"note: {d / certs.CA_CERT} is missing; run `fedmm certs init {outdir}` for the CA and server certificate")


@certs_app.command("show")
def show(outdir: Annotated[Path, typer.Argument(help="the folder of `fedmm certs init`")]) -> None:
    """List certificates and keys with expiry and fingerprints; exit 1 if anything is wrong."""
    entries = {e["file"]: e for e in certs.describe(outdir)} if outdir.is_dir() else {}
    found = certs.problems(outdir) if outdir.is_dir() else {"(folder)": "missing"}
    now = dt.datetime.now(dt.timezone.utc)
    console.print(Text(f"fedmm certs: {outdir}", style="italic"))
    for name in sorted(set(entries) | set(found)):
        # One block a file (a fingerprint is 95 characters: a row of nine columns cannot hold it at 80), every value literal.
        e = entries.get(name, {})
        expires = e.get("not_after")
        left = (dt.datetime.fromisoformat(expires) - now).days if expires else None
        status = Text(found[name], "red") if name in found else (Text("expires soon", "yellow") if left is not None and left < 30 else Text("ok", "green"))
        table = Table.grid(padding=(0, 2), pad_edge=False)
        table.add_column(style="bold", overflow="fold")
        table.add_column(overflow="fold")
        for key, value in (("file", name), ("purpose", e.get("purpose", "")), ("algorithm", e.get("algorithm", "")),
                           ("SANs", ", ".join(e.get("sans", []))), ("expires", expires[:10] if expires else ""),
                           ("days left", "" if left is None else str(left)), ("SHA-256", e.get("sha256", "")), ("mode", e.get("mode", ""))):
            if value:
                table.add_row(Text(key), Text(str(value)))
        table.add_row(Text("status"), status)
        console.print()
        console.print(table)
    if found:
        console.print(f"[red]{len(found)} problem(s)[/red]: " + escape("; ".join(f"{k}: {v}" for k, v in found.items())), highlight=False)
        raise typer.Exit(1)
    console.print(f"[green]ok[/green]: {len(entries)} files", highlight=False)
