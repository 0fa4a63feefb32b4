"""Shared fixtures: the real data folders and small, fast settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One feature cache for the whole suite (the simulations' processes inherit it), not the user's."""
    if "FEDMM_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["FEDMM_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    os.environ.pop("FEDMM_CACHE_DIR", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full real datasets (../shared/data); CI has them, a user's fresh clone may not."""
    if not (SHARED_DATA / "fsdd" / "recordings").is_dir():
        pytest.skip(f"full datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def site_data() -> tuple[object, dict[str, object]]:
    """A 64-record synthetic tabular site and the starting weights of its model (tests/ledger_support.TABULAR)."""
    from ledger_support import TABULAR

    from fedmm.data.synthetic import make_synthetic
    from fedmm.models import ModelRecipe

    data = make_synthetic(64, seed=0)
    recipe = ModelRecipe.from_config(TABULAR)
    return data, recipe.build(recipe.prepare(data).schema, seed=TABULAR.seed).state_dict()
