"""The test tiers stay true: every module the ``integration`` tier names exists (a rename must
update tests/conftest.py), and the tiers are registered markers."""

from __future__ import annotations

import tomllib
from pathlib import Path

from tests.conftest import INTEGRATION_MODULES

TESTS = Path(__file__).resolve().parents[1]


def test_every_integration_module_exists():
    missing = sorted(m for m in INTEGRATION_MODULES if not (TESTS / m).is_file())
    assert not missing, f"tests/conftest.py names missing modules: {missing}"


def test_the_tier_markers_are_registered():
    ini = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    names = {m.split(":")[0] for m in ini["markers"]}
    assert {"slow", "integration"} <= names
