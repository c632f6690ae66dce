"""Battery hygiene: the shipped batteries pass, and the checks catch the faults they name."""

import subprocess
import sys
from pathlib import Path

import pytest

from steercmp.battery import Battery, hygiene_problems
from steercmp.testing import COUPLET_BATTERY

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "experiments" / "batteries").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_batteries_have_no_design_faults(path):
    assert hygiene_problems(Battery.from_yaml(path)) == []


def test_edit_key_in_text_and_unequal_families_are_caught():
    data = {"prompts": [
        {"id": "heard_it", "text": "High in the oak I heard a singing bird,\nBut it never said a",
         "families": {"original": ["word", "heard"], "edited": ["herd", "third"], "unrelated": ["song", "wrong"]},
         "edits": {"edited": {"word": "herd", "heard": "third"}}},
        {"id": "lopsided", "text": "I wandered down beside the stream,\nAnd drifted into a",
         "families": {"original": ["dream", "seem"], "edited": ["gleam", "beam", "steam"],
                      "unrelated": ["sleep", "deep"]}},
    ]}
    problems = hygiene_problems(Battery.from_dict(data))
    assert problems == ["heard_it: edit key(s) heard already occur in the prompt text",
                        "lopsided: families of unequal size (original 2, edited 3, unrelated 2)"]
    assert hygiene_problems(Battery.from_dict(COUPLET_BATTERY)) == []


def test_check_battery_script_rejects_a_faulty_battery(tmp_path):
    import yaml

    bad = tmp_path / "bad.yaml"
    faulty = {"prompts": [dict(COUPLET_BATTERY["prompts"][1], families={
        "original": ["light"], "edited": ["white", "sight"], "unrelated": ["rain"]})]}
    bad.write_text(yaml.safe_dump(faulty))
    script = ROOT / "scripts" / "check_battery.py"
    done = subprocess.run([sys.executable, str(script), str(bad), "--hygiene-only"], capture_output=True, text=True)
    assert done.returncode == 1 and "night_light: families of unequal size" in done.stderr
    ok = subprocess.run([sys.executable, str(script), str(SHIPPED[0]), "--hygiene-only"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "no design faults" in ok.stdout
