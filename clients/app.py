"""The ClientApp the app bundle names (``clients.app:app``): fedmm's own, from the installed library.

The app is :mod:`fedmm.site.clientapp`. A deployed site (``fedmm site``) runs its installed
copy of that module whatever a server's bundle carries; this file is what ``flwr run`` and
Flower's simulation engine load.
"""

from fedmm.site.clientapp import app

__all__ = ["app"]
