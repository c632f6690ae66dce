"""Plugins see one public namespace: ``plugins/`` and ``examples/`` import ``steercmp.api``,
``steercmp.hookspecs`` and (tests only) ``steercmp.testing``; import-linter's allow-list
contract forbids every other steercmp module, and this test keeps that list complete."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ALLOWED = {"steercmp.api", "steercmp.hookspecs", "steercmp.testing"}


def steercmp_imports(source: str) -> set[str]:
    """Every steercmp module a source file imports (``from steercmp import x`` counts as
    ``steercmp.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "steercmp" or a.name.startswith("steercmp.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "steercmp":
                found |= {f"steercmp.{a.name}" for a in node.names}
            elif node.module.startswith("steercmp."):
                found.add(node.module)
    return found


def outside(source: str) -> set[str]:
    return {m for m in steercmp_imports(source) if not any(m == a or m.startswith(a + ".") for a in ALLOWED)}


def test_plugins_and_examples_import_one_namespace():
    bad = {str(f.relative_to(ROOT)): sorted(outside(f.read_text()))
           for folder in ("plugins", "examples") for f in (ROOT / folder).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_helper_check_flags_a_plugin_that_imports_the_hooks():
    assert outside("from steercmp.lm.hooks import Injection\n") == {"steercmp.lm.hooks"}
    assert outside("from steercmp import rhymes\nfrom steercmp.api import capture_at\n") == {"steercmp.rhymes"}
    assert not outside("from steercmp.api import ConfigError, rhymes\nfrom steercmp.hookspecs import hookimpl\n")


def test_the_contract_forbids_every_other_top_level_module():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in cfg["tool"]["importlinter"]["contracts"] if c["id"] == "plugins-use-the-api")
    tops = {f"steercmp.{p.stem if p.is_file() else p.name}" for p in (ROOT / "steercmp").iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert tops - {"steercmp.api", "steercmp.hookspecs"} == set(contract["forbidden_modules"])


def test_a_plugin_importing_the_hooks_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "steercmp", tmp_path / "steercmp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "plugins", tmp_path / "steercmp_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    unembed = tmp_path / "steercmp_plugins" / "unembed.py"
    unembed.write_text(unembed.read_text() + "\nfrom steercmp.lm.hooks import Injection  # deliberate violation\n")
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode != 0 and "BROKEN" in done.stdout
    assert "steercmp_plugins.unembed -> steercmp.lm.hooks" in done.stdout
