"""docs/configuration.md is generated from RunConfig and kept in step with it."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

from fedmm.config import SECTIONS, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("write_config_docs", ROOT / "scripts" / "write_config_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_configuration_page_is_what_the_script_writes() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()

    assert committed == _generator().render(), "docs/configuration.md is stale: run python scripts/write_config_docs.py"


def test_every_key_has_help_and_sits_in_a_section() -> None:
    fields = dataclasses.fields(RunConfig)

    assert fields[0].name in SECTIONS
    assert set(SECTIONS) <= {f.name for f in fields}
    for field in fields:
        assert len(str(field.metadata.get("help", ""))) > 10, f"{field.name}: give it a help text in fedmm/config.py"


@pytest.mark.parametrize("field", dataclasses.fields(RunConfig), ids=lambda f: f.name)
def test_each_key_appears_once_in_the_page(field: dataclasses.Field[object]) -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()

    assert len(re.findall(rf"^\| `{field.name.replace('_', '-')}` \|", page, flags=re.M)) == 1


def test_pyproject_lists_keys_without_their_help() -> None:
    """The help text exists once, in code: pyproject.toml carries the keys and defaults only."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.flwr.app.config]", 1)[1]
    declared = tomllib.loads("[c]\n" + section)["c"]

    assert set(declared) == set(RunConfig.keys())
    assert not [line for line in section.splitlines() if "#" in line and "=" in line.split("#")[0]]
