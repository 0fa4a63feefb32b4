"""Old module paths of fedmm 0.1, kept for one release with a DeprecationWarning.

fedmm 0.2 moved its flat top-level modules into packages (``fedmm.site``,
``fedmm.federation``, ``fedmm.runtime``). ``import fedmm.training`` still works and
gives a stand-in module that forwards every name to ``fedmm.site.training``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

__all__ = ["MOVED"]

MOVED = {
    "fedmm.training": "fedmm.site.training",
    "fedmm.site_round": "fedmm.site.runner",
    "fedmm.site_io": "fedmm.site.io",
    "fedmm.artifacts": "fedmm.federation.artifacts",
    "fedmm.secure.secagg": "fedmm.federation.secagg",
    "fedmm.secure.local": "fedmm.runtime.local",
    **{f"fedmm.{name}": f"fedmm.runtime.{name}" for name in ("simulation", "deploy", "executor", "supernode", "grid", "flower_waits", "loopback")},
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads a module that forwards to the new one."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # the default: a new, empty module

    def exec_module(self, module: types.ModuleType) -> None:
        new = MOVED[module.__name__]
        warnings.warn(
            f"{module.__name__} moved to {new} in fedmm 0.2; the old path goes in the next release. Fix: import {new}",
            DeprecationWarning, stacklevel=2,
        )
        target = importlib.import_module(new)
        module.__dict__["__getattr__"] = lambda name: getattr(target, name)
        module.__dict__["__all__"] = list(getattr(target, "__all__", ()))
        module.__doc__ = f"Moved to :mod:`{new}`."


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
