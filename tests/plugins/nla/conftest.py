"""Fixtures for the NLA plugin tests: tiny random checkpoints in the released layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from steercmp_plugins.nla import tiny_pair as tiny


@pytest.fixture(scope="session")
def pair_dir(tmp_path_factory) -> tuple[Path, Path]:
    return tiny.write_pair(tmp_path_factory.mktemp("nla"))


@pytest.fixture
def make_pair(tmp_path):
    def make(**kwargs):
        return tiny.write_pair(tmp_path, **kwargs)

    return make
