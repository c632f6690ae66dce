"""The experiment reader: battery short names and paths, and the one spelling of `scalings`."""

from __future__ import annotations

import pytest
import yaml

from steercmp.battery_files import experiments_dir, shipped_batteries
from steercmp.config import Experiment
from steercmp.errors import ConfigError


def _exp(tmp_path, **overrides) -> Experiment:
    data = {"layer": 1, "battery": "note8", "methods": ["unembed_direction"], "alphas": [0, 2]}
    data.update(overrides)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return Experiment.from_yaml(path)


def test_battery_short_name_loads_the_shipped_battery(tmp_path):
    exp = _exp(tmp_path, battery="note8")
    assert len(exp.battery.prompts) == 8
    assert exp.battery_path == "note8"  # what the user wrote
    shipped = experiments_dir() / "batteries" / "note8.yaml"
    assert exp.battery_file == shipped
    assert yaml.safe_load(exp.snapshot())["battery"] == str(shipped)  # the file actually read
    assert {"note8", "expanded"} <= set(shipped_batteries())


def test_unknown_short_name_lists_the_shipped_names(tmp_path):
    with pytest.raises(ConfigError) as err:
        _exp(tmp_path, battery="note9")
    line = err.value.one_line()
    assert "exp.yaml: battery: 'note9' is not a shipped battery" in line
    assert all(name in line for name in shipped_batteries())


def test_relative_battery_resolves_against_the_experiment_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text((experiments_dir() / "batteries" / "note8.yaml").read_text())
    monkeypatch.chdir(tmp_path / "sub")  # the current folder plays no part
    exp = _exp(tmp_path, battery="sub/b.yaml")
    assert len(exp.battery.prompts) == 8 and exp.battery_path == "sub/b.yaml"
    with pytest.raises(ConfigError) as err:
        _exp(tmp_path, battery="b.yaml")
    line = err.value.one_line()
    assert f"battery file {tmp_path / 'b.yaml'} not found" in line
    assert f"(relative paths resolve against the experiment file's folder, {tmp_path.resolve()})" in line
    assert "note8" in line.split("; fix: ")[1]


def test_scaling_singular_is_rejected(tmp_path):
    with pytest.raises(ConfigError) as err:
        _exp(tmp_path, scaling=["raw"])
    line = err.value.one_line()
    assert line.startswith(f"{tmp_path / 'exp.yaml'}: scaling: ")
    assert line.endswith("; fix: rename `scaling` to `scalings` (a list, e.g. [raw])")


@pytest.mark.parametrize("value, needle", [(5, "must be a list of names"), (["raw", "raw"], "repeats"),
                                           ([], "is empty"), (["up"], "unknown scaling")])
def test_bad_scalings(tmp_path, value, needle):
    with pytest.raises(ConfigError, match=needle):
        _exp(tmp_path, scalings=value)


def test_unknown_method_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        _exp(tmp_path, methods=[{"name": "unembed_direction", "option": {"norm_fraction": 1}}])
    assert "exp.yaml: methods[0].option: unknown method key 'option'" in err.value.one_line()
