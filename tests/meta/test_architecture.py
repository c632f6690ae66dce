"""The architecture rules, enforced: import-linter contracts (pyproject.toml), file sizes, and
hooks registered only inside ``steercmp.lm``. docs/architecture.md is the map these protect."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 500
HOOK_CALL = re.compile(r"\.register_(forward|forward_pre|full_backward|full_backward_pre)_hook\(")


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240, check=False)


def test_import_contracts_hold():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_a_core_to_plugin_import_breaks_the_contract(tmp_path):
    """A copy of the tree with one deliberate ``steercmp -> steercmp_plugins`` import fails."""
    shutil.copytree(ROOT / "steercmp", tmp_path / "steercmp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "plugins", tmp_path / "steercmp_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    runner = tmp_path / "steercmp" / "run" / "runner.py"
    runner.write_text(runner.read_text() + "\nimport steercmp_plugins.controls  # deliberate violation\n")
    done = _lint(tmp_path, pythonpath=tmp_path)
    assert done.returncode != 0
    assert "steercmp never imports steercmp_plugins" in done.stdout and "BROKEN" in done.stdout
    assert "steercmp.run.runner -> steercmp_plugins.controls" in done.stdout


def _sources() -> list[Path]:
    return sorted([*(ROOT / "steercmp").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])


def test_no_source_file_is_oversized():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _sources()}
    big = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not big, f"split these files (over {MAX_LINES} lines): {big}"


def test_only_the_lm_package_registers_hooks():
    registering = {str(p.relative_to(ROOT)) for p in _sources() if HOOK_CALL.search(p.read_text())}
    assert registering and all(p.startswith("steercmp/lm/") for p in registering), registering
