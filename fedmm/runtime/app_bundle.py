"""The Flower App's bundle files on their own, for ``flwr run`` to build its FAB from.

``flwr run DIR`` builds the app bundle (FAB) from every file under ``DIR``: Flower 1.42 walks the
whole folder (``os.walk``, resolving each path) and only then applies ``.gitignore`` and the app's
``fab-include``. In a checkout whose virtual environment is ``.venv`` inside it, that is about
58,000 files and 8 s of the 10 s ``flwr build`` takes on 2 cores, for a bundle of five files
(``pyproject.toml``, ``server/*.py``, ``clients/*.py``). :func:`staged_app` copies just the files
that ``[tool.flwr.app] fab-include`` names into a folder of their own: ``flwr run`` on it builds
the same bundle, byte for byte (the same FAB hash), in about 2 s.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

__all__ = ["staged_app"]


def staged_app(app_dir: Path, into: Path) -> Path:
    """``into/<app_dir's name>`` holding a copy of the files of ``app_dir`` that its ``pyproject.toml``'s
    ``[tool.flwr.app] fab-include`` patterns name (each a glob relative to ``app_dir``); ``app_dir``
    itself when it sets no ``fab-include`` (then only the whole folder says what the bundle holds)."""
    config = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not patterns:
        return app_dir
    staged = into / app_dir.name
    shutil.rmtree(staged, ignore_errors=True)  # a file the app no longer has must not stay in its bundle
    for pattern in patterns:
        for source in sorted(app_dir.glob(pattern)):
            if source.is_file() and not source.is_symlink():  # Flower leaves symlinks out too
                target = staged / source.relative_to(app_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    return staged
