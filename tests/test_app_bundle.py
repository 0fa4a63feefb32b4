"""The staged app bundle: the very FAB `flwr run .` builds from the checkout, from five files instead of the whole tree."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedmm.runtime.app_bundle import staged_app
from fedmm.runtime.simulation import find_app_dir


def test_the_staged_app_builds_the_checkouts_fab_byte_for_byte(tmp_path: Path) -> None:
    checkout = find_app_dir()
    start = time.perf_counter()
    staged = staged_app(checkout, tmp_path)
    staging = time.perf_counter() - start
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert "pyproject.toml" in files and "server/app.py" in files and "clients/app.py" in files
    assert all(f == "pyproject.toml" or f.startswith(("server/", "clients/")) for f in files), files
    assert build_fab_from_disk(staged) == build_fab_from_disk(checkout)  # what Flower builds from each: the same bytes
    assert staging < 1.0, staging  # a handful of copies (a sanity bound, not a benchmark)


def test_an_app_without_fab_include_is_bundled_from_its_own_folder(tmp_path: Path) -> None:
    app = tmp_path / "plain-app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.flwr.app]\npublisher = "x"\n')
    assert staged_app(app, tmp_path / "stage") == app
    assert not (tmp_path / "stage").exists()
