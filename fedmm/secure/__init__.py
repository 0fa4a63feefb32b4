"""Securing a federation: what a site sends under secure aggregation, TLS certificates
and SuperNode authentication keys.

- ``fedmm.secure.update``: the update a site masks (clipped to SecAgg+'s range, counted;
  client-level DP's clip and noise share);
- ``fedmm.secure.params``: SecAgg+'s quantisation settings as a site sees them;
- ``fedmm.secure.certs`` / ``certs_cli``: a private CA, server certificates and SuperNode
  keys (``fedmm certs``).

The server's side of SecAgg+ is :mod:`fedmm.federation.secagg`. May import
``fedmm.config``/``errors``/``protocol``, ``fedmm.data``, ``fedmm.models`` and
``fedmm.privacy`` only.
"""

__all__: list[str] = []
