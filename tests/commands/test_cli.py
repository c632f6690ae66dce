"""The command line: bad configs stop with one line naming the field, exit code 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steercmp.cli import main

ROOT = Path(__file__).resolve().parents[2]


def write(tmp: Path, exp: dict, battery: dict | None = None) -> Path:
    battery = battery or yaml.safe_load((ROOT / "experiments/batteries/note8.yaml").read_text())
    (tmp / "bat.yaml").write_text(yaml.safe_dump(battery))
    base = {"name": "t", "layer": 12, "battery": "bat.yaml", "methods": ["unembed_direction"]}
    base.update(exp)
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize("exp, needle", [
    ({"methods": ["no_such_method"]}, "unknown method 'no_such_method'"),
    ({"controls": ["noop", "nope"]}, "unknown control 'nope'"),
    ({"layer": 40}, "layer 40 is out of range"),
    ({"alphas": [1, "two"]}, "non-numeric value 'two'"),
    ({"scalings": ["sideways"]}, "unknown scaling 'sideways'"),
    ({"decision": {"alphas": [3]}}, "decision alpha 3.0 is not in the alpha sweep"),
    ({"decision": {"alphas": [4]}, "completions": {"alphas": [0, 2]}}, "decision alpha 4 has no completions"),
])
def test_bad_config_one_line_exit_2(tmp_path, capsys, exp, needle):
    code = main(["plan", str(write(tmp_path, exp))])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "fix:" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_position_rule_matching_nothing(tmp_path, capsys):
    battery = {"prompts": [{"id": "a", "text": "one line only", "inject": "regex:zzz",
                            "families": {"original": ["dream"], "edited": ["beam"], "unrelated": ["stone"]}}]}
    from steercmp.battery import Battery
    from steercmp.errors import ConfigError
    from steercmp.lm.prompts import tokenize_battery
    from steercmp.testing import couplet_tokenizer as tiny_tokenizer

    bat = Battery.from_dict(battery, source="bat.yaml")
    with pytest.raises(ConfigError, match=r"prompt a\.inject: position rule 'regex:zzz' matches nothing"):
        tokenize_battery(bat, tiny_tokenizer())


def test_missing_experiment_file(capsys):
    assert main(["plan", "/nonexistent/exp.yaml"]) == 2
    assert "experiment file not found" in capsys.readouterr().err


def test_plan_12b_config_lists_stages():
    out = subprocess.run([sys.executable, "-m", "steercmp", "plan", str(ROOT / "experiments/gemma3-12b-v3.yaml")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "google/gemma-3-12b-it" in out.stdout and "estimated peak:" in out.stdout
    peak = out.stdout.split("estimated peak:", 1)[1].splitlines()[0]
    assert "process baseline" in peak and "tokenizer" in peak and "weights 22.70 GiB" in peak
    assert "device auto:" in out.stdout
    assert "nla_text_edit" in out.stdout and "sae_features" in out.stdout


def test_plugins_command_lists_builtins(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("noop", "random_delta", "wrong_position", "unembed_direction", "nla_text_edit"):
        assert name in out


@pytest.mark.parametrize("argv", [["bench", "--out", "{dir}"], ["nla", "reconstruct", "--ar", "mini", "--text", "x",
                                                                  "--out", "{dir}"]])
def test_output_paths_are_checked_before_any_work(argv, tmp_path, capsys):
    """A directory where a file is expected fails at once (it once failed after 12 minutes)."""
    import time

    start = time.perf_counter()
    code = main([a.replace("{dir}", str(tmp_path)) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "--out: output file" in err[0] and "is a directory" in err[0]
    assert time.perf_counter() - start < 30  # nothing was loaded or built
