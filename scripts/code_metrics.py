"""The code-shape numbers issue 21 asks for, reproducibly: the largest file, the longest functions,
the longest parameter lists, duplicate module names, and the steercmp modules plugins/ and examples/
import. Import cycles are import-linter's ``no-cycles`` contract (``lint-imports``); repeated code is
the ``duplicates`` tool.

    python scripts/code_metrics.py [--top 5]
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("steercmp", "plugins")


def python_files(folders: tuple[str, ...] = SOURCES) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def functions(path: Path) -> list[tuple[str, int, int]]:
    """``(qualified name, lines, parameters)`` of every function in ``path`` (``self``/``cls``
    not counted; ``*args``/``**kwargs`` count one each)."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
                n = len([p for p in params if p.arg not in ("self", "cls")]) + bool(a.vararg) + bool(a.kwarg)
                name = f"{prefix}{child.name}"
                out.append((name, (child.end_lineno or child.lineno) - child.lineno + 1, n))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def plugin_imports() -> set[str]:
    """The steercmp modules that plugins/ and examples/ import directly."""
    names: set[str] = set()
    for path in python_files(("plugins", "examples")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
    return {n for n in names if n == "steercmp" or n.startswith("steercmp.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    files = python_files()
    sizes = sorted(((len(p.read_text().splitlines()), p.relative_to(ROOT)) for p in files), reverse=True)
    print("largest files:", ", ".join(f"{p} {n}" for n, p in sizes[: args.top]))
    funcs = [(lines, params, f"{p.relative_to(ROOT)}:{name}") for p in files for name, lines, params in functions(p)]
    print("longest functions (lines):", ", ".join(f"{w} {n}" for n, _, w in sorted(funcs, reverse=True)[: args.top]))
    print("functions over 80 lines:", sum(1 for n, _, _ in funcs if n > 80))
    by_params = sorted(funcs, key=lambda f: f[1], reverse=True)
    print("largest parameter lists:", ", ".join(f"{w} {k}" for _, k, w in by_params[: args.top]))
    print("parameter lists over 8:", sum(1 for _, k, _ in funcs if k > 8))
    names = Counter(p.name for p in files if p.name != "__init__.py")
    print("module names used twice or more:", {n: c for n, c in names.items() if c > 1} or "none")
    print("steercmp modules imported by plugins/ and examples/:", sorted(plugin_imports()))


if __name__ == "__main__":
    main()
