"""Every command-line flag a message suggests exists: an error that says "pass --decision-alpha"
when the flag is --alphas sends the user nowhere."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

from steercmp.cli import build_parser
from steercmp.plugin_manager import build_plugin_manager

ROOT = Path(__file__).resolve().parents[2]
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9])")
#: flags of other programs that steercmp's messages may quote
FOREIGN = {"--no-deps", "--num_processes", "--upgrade"}


def _parser_flags() -> set[str]:
    parser = build_parser(build_plugin_manager().commands())
    flags: set[str] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            flags.update(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return flags


def _is_error_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
    return name.endswith("Error")


def _suggested_flags() -> dict[str, list[str]]:
    """Flags named in the message, ``where`` or ``fix`` of every error steercmp and its
    built-in plugins raise."""
    found: dict[str, list[str]] = {}
    for path in sorted([*(ROOT / "steercmp").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]):
        for call in filter(_is_error_call, ast.walk(ast.parse(path.read_text()))):
            for node in ast.walk(call):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    for flag in FLAG.findall(node.value):
                        found.setdefault(flag, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_suggested_flag_exists():
    known = _parser_flags() | FOREIGN
    missing = {flag: where for flag, where in _suggested_flags().items() if flag not in known}
    assert not missing, f"messages name flags the CLI does not have: {missing}"


def test_the_check_sees_the_flags_it_should():
    suggested = _suggested_flags()
    assert {"--alphas", "--processes", "--step", "--plugins-dir"} <= set(suggested)
    assert "--porcelain" not in suggested  # a git argument, not a message
    assert "--alphas" in _parser_flags()
