"""fedmm: privacy-preserving multimodal federated learning on Flower and Opacus.

The packages, from the ground floor up (each imports only from the floors below it;
``tests/test_layers.py`` keeps it so):

- ``fedmm.config``, ``fedmm.errors``, ``fedmm.protocol``: the run configuration, the
  error hierarchy, and every key that crosses the wire; they import nothing else;
- ``fedmm.data``: modalities, sources, preprocessing, augmentation, simulated federations;
- ``fedmm.models``: encoders, fusions, objectives, the model recipe, evaluation;
- ``fedmm.privacy``: DP-SGD, accountants, each site's policy and ledger, the audit;
- ``fedmm.secure``: what a site sends under secure aggregation, certificates and keys;
- ``fedmm.plan``: a run's parts built from its configuration, every ``auto`` resolved;
- ``fedmm.site``: one site's round (what a data site runs);
- ``fedmm.federation``: the server's book, strategies and run artifacts (what the server runs);
- ``fedmm.runtime``: the processes of a simulation or a deployment;
- ``fedmm.cli``: the ``fedmm`` command.

The Flower components live outside the package: ``server/`` (ServerApp) and
``clients/`` (ClientApp), thin translators between Flower messages and
``fedmm.federation`` / ``fedmm.site``.
"""

from fedmm import _moved  # noqa: F401  old module paths, kept for one release

__version__ = "0.2.0"
__all__ = ["__version__"]
