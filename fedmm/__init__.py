"""fedmm: privacy-preserving multimodal federated learning on Flower and Opacus.

Packages: ``fedmm.data`` (modalities, sources), ``fedmm.models`` (encoders,
fusion), ``fedmm.privacy`` (DP-SGD accounting); modules: ``config`` (the run
configuration), ``site`` (one site's round), ``federation`` (the server's side),
``artifacts`` (run folders), ``simulation`` and ``cli`` (the ``fedmm`` command).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
