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


def test_usable_selection_writes_nothing_when_too_few_prompts_are_usable(tmp_path):
    """The pre-declared usability rule on a tiny checkpoint: asking for more usable prompts than the
    battery has is exit 2 with one line, and neither the battery nor the rejects file is written."""
    import yaml

    from steercmp.testing import save_tiny_checkpoint

    words = [w for p in COUPLET_BATTERY["prompts"] for fam in p["families"].values() for w in fam]
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", words=words)
    good = {**COUPLET_BATTERY, "prompts": COUPLET_BATTERY["prompts"][:2]}
    src = tmp_path / "candidates.yaml"
    src.write_text(yaml.safe_dump(good))
    script = ROOT / "scripts" / "check_battery.py"
    out, rejects = tmp_path / "usable.yaml", tmp_path / "rejects.yaml"
    args = [sys.executable, str(script), str(src), "--usable", "--model", str(ckpt), "--layer", "1",
            "--out", str(out), "--rejects", str(rejects)]
    done = subprocess.run([*args, "--min-usable", "3"], capture_output=True, text=True)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "fewer than 3" in err[-1] and "fix:" in err[-1]
    assert not out.exists() and not rejects.exists()
    bad_layer = subprocess.run([*args[:-4], "--layer", "9"], capture_output=True, text=True)
    assert bad_layer.returncode == 2 and "--layer" in bad_layer.stderr and "outside the model" in bad_layer.stderr
    ok = subprocess.run(args, capture_output=True, text=True)
    if "0/2 prompts usable" in ok.stdout:  # a random tiny model may prefer no rhyme at all
        assert ok.returncode == 2
    else:
        assert ok.returncode == 0 and out.is_file() and rejects.is_file()
