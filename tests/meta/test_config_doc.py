"""docs/config.md documents exactly the keys the experiment reader accepts.

The accepted keys come from the constants ``steercmp.config`` itself checks unknown keys against
(``EXPERIMENT_KEYS``, ``MODEL_KEYS``, ``METHOD_KEYS``, ``COMPLETION_KEYS``, ``DECISION_KEYS``); the
documented keys are the first-column names of the doc's ``| key |`` tables (``name``,
``model.id``, ``methods[].label``, ...). A probe also checks that the reader really accepts each
documented key, and the doc's complete example must load.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from steercmp import config
from steercmp.config import Experiment
from steercmp.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
SECTIONS = {"model": config.MODEL_KEYS, "methods[]": config.METHOD_KEYS,
            "completions": config.COMPLETION_KEYS, "decision": config.DECISION_KEYS}


def accepted_keys() -> set[str]:
    keys = set(config.EXPERIMENT_KEYS)
    for section, names in SECTIONS.items():
        keys |= {f"{section}.{name}" for name in names}
    return keys


def documented_keys(text: str) -> set[str]:
    """The backticked name in the first cell of every row of a table whose header is ``| key |``."""
    keys: set[str] = set()
    in_key_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_key_table = False
            continue
        first = line.strip("|").split("|")[0].strip()
        if first == "key":
            in_key_table = True
        elif in_key_table and not set(first) <= set("-: "):
            match = re.fullmatch(r"`([^`]+)`", first)
            assert match, f"docs/config.md: key cell {first!r} is not one `key`"
            keys.add(match.group(1))
    return keys


def minimal() -> dict:
    return {"layer": 1, "battery": "b.yaml", "methods": ["m"], "decision": {"alphas": [2]},
            "completions": {"alphas": [2]}, "alphas": [0, 2]}


def _with(key: str, value: object) -> dict:
    data = minimal()
    section, _, name = key.rpartition(".")
    if not section:
        data[name] = value
    elif section == "methods[]":
        data["methods"] = [{"name": "m", name: value}] if name != "name" else [{"name": value}]
    else:
        data[section] = {**dict(data.get(section) or {}), name: value}
    return data


def test_every_accepted_key_is_documented():
    missing = sorted(accepted_keys() - documented_keys(DOC.read_text()))
    assert not missing, f"the config reader accepts keys docs/config.md does not list: {missing}"


def test_every_documented_key_is_accepted():
    extra = sorted(documented_keys(DOC.read_text()) - accepted_keys())
    assert not extra, f"docs/config.md lists keys the config reader rejects: {extra}"


@pytest.mark.parametrize("key", sorted(accepted_keys()))
def test_reader_accepts_key(key, tiny_battery):
    """The constants are what the reader checks: no accepted key is refused as unknown."""
    for value in (None, "x"):
        try:
            Experiment.from_dict(_with(key, value), battery=tiny_battery)
        except ConfigError as exc:
            assert "unknown" not in exc.message or "key" not in exc.message, exc.one_line()


@pytest.mark.parametrize("key", ["bogus", "model.bogus", "methods[].bogus", "completions.bogus",
                                 "decision.bogus"])
def test_reader_rejects_undocumented_key(key, tiny_battery):
    with pytest.raises(ConfigError, match="unknown .*key 'bogus'"):
        Experiment.from_dict(_with(key, 1), battery=tiny_battery)


def test_renamed_keys_are_mentioned_not_documented():
    text = DOC.read_text()
    for old, (new, _fix) in config.RENAMED_KEYS.items():
        assert old not in documented_keys(text) and f"`{old}`" in text and new in config.EXPERIMENT_KEYS


def test_complete_example_loads():
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/config.md has no yaml example"
    exp = Experiment.from_dict(yaml.safe_load(blocks[-1]), source="docs/config.md")
    assert exp.battery_path == "note8" and len(exp.battery.prompts) == 8
    assert set(exp.raw) == set(config.EXPERIMENT_KEYS), "the complete example should use every top-level key"


@pytest.fixture
def tiny_battery():
    from steercmp.testing import tiny_battery

    return tiny_battery()
