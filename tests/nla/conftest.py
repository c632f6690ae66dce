"""Fixtures for the NLA plugin tests: tiny random checkpoints in the released layout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Until the package is installed with its steercmp_plugins mapping, import it from the checkout.
if importlib.util.find_spec("steercmp_plugins") is None:  # pragma: no cover - install-dependent
    root = HERE.parents[1] / "plugins"
    spec = importlib.util.spec_from_file_location("steercmp_plugins", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["steercmp_plugins"] = module
    spec.loader.exec_module(module)

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def pair_dir(tmp_path_factory) -> tuple[Path, Path]:
    return tiny.write_pair(tmp_path_factory.mktemp("nla"))


@pytest.fixture
def make_pair(tmp_path):
    def make(**kwargs):
        return tiny.write_pair(tmp_path, **kwargs)

    return make
