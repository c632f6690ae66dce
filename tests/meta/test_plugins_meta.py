"""Meta-tests in the style of datasette, and plugin-loading behaviour.

- every hookspec has a section in docs/plugins.md, generated from (and equal to) its docstring;
- every hookspec is implemented by at least one test in tests/ (a `def register_...`);
- the plugin docs render cleanly (balanced fences, relative links that resolve);
- the tutorial's method code runs and passes the conformance kit;
- loading: duplicate names rejected, a misspelled hookimpl fails loudly, a plugins directory
  loads *.py files, `steercmp plugins` lists exactly what loaded with its origin, and plugin
  commands (register_commands) reach the CLI.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest

from steercmp.errors import PluginError
from steercmp.hookspecs import hookimpl
from steercmp.plugin_manager import build_plugin_manager

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PLUGIN_DOCS = ("plugins.md", "tutorial-method-plugin.md")


def _gen():
    spec = importlib.util.spec_from_file_location("gen_hook_docs", ROOT / "scripts" / "gen_hook_docs.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HOOKS = [name for name, _fn in _gen().hookspecs()]


def test_hookspecs_found():
    assert HOOKS == ["register_methods", "register_controls", "register_report_sections", "register_commands"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    assert f"### `{hook}(" in (DOCS / "plugins.md").read_text(encoding="utf-8")


def test_hook_reference_matches_docstrings():
    gen = _gen()
    current = (DOCS / "plugins.md").read_text(encoding="utf-8")
    assert gen.render(current) == current, "run: python scripts/gen_hook_docs.py"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    """Some test implements the hook (not merely mentions it)."""
    pattern = re.compile(rf"def {hook}\(")
    hits = [p for p in (ROOT / "tests").rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert hits, f"no test in tests/ implements {hook}"


@pytest.mark.parametrize("doc", PLUGIN_DOCS)
def test_docs_render_cleanly(doc):
    text = (DOCS / doc).read_text(encoding="utf-8")
    assert text.count("```") % 2 == 0, "unbalanced code fences"
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - markdown-it-py is usually present
        MarkdownIt = None
    if MarkdownIt is not None:
        md = MarkdownIt("commonmark").enable("table")
        tokens = md.parse(text)
        assert tokens and tokens[0].type == "heading_open"
        html = md.render(text)
        assert "<table>" in html or doc != "plugins.md"
        links = [child.attrs.get("href") for tok in tokens if tok.children
                 for child in tok.children if child.type == "link_open"]
    else:
        links = re.findall(r"\]\(([^)]+)\)", text)
    for href in links:
        if href.startswith(("http://", "https://", "#")):
            continue
        target = (DOCS / href.split("#", 1)[0]).resolve()
        assert target.exists(), f"{doc}: broken relative link {href}"


def test_tutorial_method_code_passes_the_kit():
    import steercmp.testing

    text = (DOCS / "tutorial-method-plugin.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S)
                 if "steercmp_actadd/__init__.py" in b)
    module = types.ModuleType("tutorial_actadd")
    sys.modules["tutorial_actadd"] = module
    try:
        exec(compile(textwrap.dedent(block), "<tutorial>", "exec"), module.__dict__)
        module.ActAdd.__module__ = "tutorial_actadd"
        module.ActAdd.name = "tutorial_actadd"  # the installed example may hold "actadd"
        report = steercmp.testing.check_method(module.ActAdd, plugin=module)
    finally:
        sys.modules.pop("tutorial_actadd", None)
    assert report.checks[-1] == "engine"


# ------------------------------------------------------------------ loading behaviour
def _method(name):
    from steercmp.api import Method

    class M(Method):
        def propose(self, contexts, runtime):
            return []

    M.name = name
    return M


_COUNTER = itertools.count()


def _plugin(**hooks):
    ns = types.ModuleType(f"test_plugin_{next(_COUNTER)}")
    for hook, fn in hooks.items():
        setattr(ns, hook, hookimpl(fn))
    return ns


def test_duplicate_method_names_rejected():
    a = _plugin(register_methods=lambda register: register(_method("twin")))
    b = _plugin(register_methods=lambda register: register(_method("twin")))
    with pytest.raises(PluginError, match="registered twice"):
        build_plugin_manager(builtins=(), entry_points=False, extra=[a, b])


def test_duplicate_control_names_rejected():
    from steercmp_plugins.controls import Noop

    dup = type("Noop2", (Noop,), {"name": "noop"})

    class Plugin:
        @hookimpl
        def register_controls(self, register):
            register(dup)

    with pytest.raises(PluginError, match="control 'noop' is registered twice"):
        build_plugin_manager(builtins=("steercmp_plugins.controls",), entry_points=False,
                             extra=[Plugin()])


def test_duplicate_command_names_rejected():
    class Plugin:
        @hookimpl
        def register_commands(self, register):
            register("twice", "help", lambda p: None, lambda a: 0)
            register("twice", "help", lambda p: None, lambda a: 0)

    ps = build_plugin_manager(builtins=(), entry_points=False, extra=[Plugin()])
    with pytest.raises(PluginError, match="registered twice"):
        ps.commands()


def test_misspelled_hookimpl_fails_loudly():
    class Plugin:
        @hookimpl
        def register_method(self, register):  # missing "s"
            pass

    with pytest.raises(PluginError, match="unknown hook"):
        build_plugin_manager(builtins=(), entry_points=False, extra=[Plugin()])


def test_registering_a_non_method_fails():
    bad = _plugin(register_methods=lambda register: register(object))
    with pytest.raises(PluginError, match="not a Method subclass"):
        build_plugin_manager(builtins=(), entry_points=False, extra=[bad])


PLUGIN_FILE = '''
from steercmp.api import Method, Proposal
from steercmp.hookspecs import hookimpl


class DirMethod(Method):
    name = "dir_method"
    description = "loaded from a plugins directory"

    def propose(self, contexts, runtime):
        return []


@hookimpl
def register_methods(register):
    register(DirMethod)


@hookimpl
def register_commands(register):
    def configure(parser):
        parser.add_argument("--shout", action="store_true")

    def handler(args):
        print("HELLO" if args.shout else "hello")
        return 0

    register("hello", "say hello", configure, handler)
'''


@pytest.fixture
def plugins_dir(tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "dir_plugin.py").write_text(PLUGIN_FILE)
    (d / "README.txt").write_text("not a plugin")
    return d


def test_plugins_dir_loads_py_files(plugins_dir):
    ps = build_plugin_manager(builtins=(), entry_points=False, plugins_dir=plugins_dir)
    assert ps.methods["dir_method"].origin == "plugins dir"
    assert ps.sources == [(str(plugins_dir / "dir_plugin.py"), "plugins dir")]
    assert [c[0] for c in ps.commands()] == ["hello"]


def test_plugins_dir_errors(tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        build_plugin_manager(builtins=(), entry_points=False, plugins_dir=tmp_path / "missing")
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match="broken.py.*boom"):
        build_plugin_manager(builtins=(), entry_points=False, plugins_dir=tmp_path)


def test_cli_plugins_lists_exactly_what_loaded(plugins_dir, capsys):
    from steercmp.cli import main

    assert main(["--plugins-dir", str(plugins_dir), "plugins"]) == 0
    out = capsys.readouterr().out
    loaded = out.split("plugins loaded:\n", 1)[1].split("methods:", 1)[0]
    expected = build_plugin_manager(plugins_dir=plugins_dir)
    assert loaded.splitlines() == [f"  {name}  ({origin})" for name, origin in expected.sources]
    methods = out.split("methods:\n", 1)[1].split("controls:", 1)[0].splitlines()
    assert [ln.split()[0] for ln in methods] == sorted(expected.methods)
    line = next(ln for ln in methods if ln.split()[0] == "dir_method")
    assert "(plugins dir)" in line and "loaded from a plugins directory" in line


def test_plugin_command_reaches_the_cli(plugins_dir, capsys):
    from steercmp.cli import main

    assert main(["--plugins-dir", str(plugins_dir), "hello", "--shout"]) == 0
    assert capsys.readouterr().out.strip() == "HELLO"


def test_register_controls_from_a_plugin():
    from steercmp.api import Control

    class Half(Control):
        name = "half_delta"

        def derive(self, target, context, generator):
            return type(target)(prompt_id=target.prompt_id, family=target.family,
                                delta=target.delta * 0.5, position=target.position)

    class Plugin:
        @hookimpl
        def register_controls(self, register):
            register(Half)

    ps = build_plugin_manager(builtins=(), entry_points=False, extra=[Plugin()])
    assert ps.control("half_delta") is Half
    import steercmp.testing

    derived = steercmp.testing.check_control(Half, plugin=Plugin())
    assert derived and all(p.delta is not None for p in derived)
