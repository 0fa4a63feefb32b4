"""A site proves its name with the key it is enrolled with (``fedmm certs site NAME``).

SuperNode authentication ties a node to a registered key, but the site's *name* in its
replies is what the site says. A site holding george's key could call itself jackson and be
counted as jackson. So each reply of a deployed site carries a proof: an ECDSA P-384
signature, with the site's own SuperNode key, over the run, the round, the node and the name
it claims. The server checks it against the public key enrolled under that name
(``pki/sites/NAME.pub``) and refuses a reply whose proof is missing or does not verify.

>>> import tempfile, pathlib
>>> from fedmm.secure.certs import create_site_keys
>>> pki = pathlib.Path(tempfile.mkdtemp())
>>> (george_key, _), = create_site_keys(pki, ["george"])
>>> proof = sign_claim(george_key, run_id="r1", server_round=3, node=42, site="george")
>>> keys = EnrolledKeys.load(pki / "sites")
>>> keys.verify(proof, run_id="r1", server_round=3, node=42, site="george")
>>> keys.verify(proof, run_id="r1", server_round=3, node=42, site="jackson")
Traceback (most recent call last):
...
fedmm.errors.FederationError: node 42 claims site 'jackson', which is not enrolled (no jackson.pub among the server's site keys); refused
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmm.errors import ConfigError, FederationError

__all__ = ["sign_claim", "EnrolledKeys", "KEYS_ENV"]

KEYS_ENV = "FEDMM_SITE_KEYS"  # set by `fedmm server`: the folder of enrolled site keys the ServerApp checks proofs against


def _claim(*, run_id: str, server_round: int, node: int, site: str) -> bytes:
    return f"fedmm site claim v1|run={run_id}|round={server_round}|node={node}|site={site}".encode()


def sign_claim(key_file: str | Path, *, run_id: str, server_round: int, node: int, site: str) -> str:
    """The site's proof for one reply: a signature with its SuperNode key (OpenSSH or PEM), base64."""
    try:
        data = Path(key_file).read_bytes()
        key = serialization.load_ssh_private_key(data, None) if b"OPENSSH" in data else serialization.load_pem_private_key(data, None)
    except (OSError, ValueError) as err:
        raise ConfigError("site.key", f"cannot read the site's key ({type(err).__name__})", value=str(key_file), fix="point key at the site's SuperNode key from 'fedmm certs site'") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("site.key", "is not an elliptic-curve key", value=str(key_file), fix="use the key 'fedmm certs site' made")
    return base64.b64encode(key.sign(_claim(run_id=run_id, server_round=server_round, node=node, site=site), ec.ECDSA(hashes.SHA384()))).decode()


@dataclass(frozen=True)
class EnrolledKeys:
    """The public keys of the enrolled sites, by name."""

    keys: dict[str, ec.EllipticCurvePublicKey]

    @classmethod
    def load(cls, folder: str | Path) -> EnrolledKeys:
        folder = Path(folder)
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for path in sorted(folder.glob("*.pub")):
            key = serialization.load_ssh_public_key(path.read_bytes())
            if isinstance(key, ec.EllipticCurvePublicKey):
                keys[path.stem] = key
        if not keys:
            raise ConfigError(KEYS_ENV, f"no enrolled site key (*.pub) in {folder}", value=str(folder), fix="make them with 'fedmm certs site PKI NAME...'")
        return cls(keys)

    def verify(self, proof: object, *, run_id: str, server_round: int, node: int, site: str) -> None:
        """Raise FederationError unless ``proof`` is ``site``'s signature over this claim."""
        key = self.keys.get(site)
        if key is None:
            raise FederationError(f"node {node} claims site {site!r}, which is not enrolled (no {site}.pub among the server's site keys); refused")
        try:
            signature = base64.b64decode(str(proof), validate=True)
            key.verify(signature, _claim(run_id=run_id, server_round=server_round, node=node, site=site), ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            raise FederationError(
                f"node {node} claims site {site!r} but its reply carries no valid proof made with {site}'s enrolled key; refused "
                "(a borrowed name, or a site started with another site's key)"
            ) from None
