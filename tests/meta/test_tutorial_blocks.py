"""Every code block of docs/tutorial-method-plugin.md runs as printed.

Python blocks: the plugin module is written to a temporary package and imported; the test block
runs against it (the conformance kit); the snippets about ``ctx`` and ``Proposal`` run against a
real prompt context; the ``resources()`` snippet is defined and called. The TOML block must
declare the entry point the example package declares; the YAML block must load as an experiment
whose methods exist once the tutorial's plugin is registered; every ``steercmp`` command in the
bash blocks must be a real subcommand.
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "tutorial-method-plugin.md"
BLOCK = re.compile(r"^( *)```(\w+)\n(.*?)^\1```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [textwrap.dedent(body) for _, kind, body in BLOCK.findall(DOC.read_text()) if kind == lang]


def _one(lang: str, first_line: str) -> str:
    found = [b for b in blocks(lang) if b.splitlines()[0].strip() == first_line]
    assert len(found) == 1, f"the tutorial has {len(found)} {lang} blocks starting {first_line!r}"
    return found[0]


@pytest.fixture
def tutorial_plugin(tmp_path, monkeypatch):
    """The tutorial's plugin module, imported from a temporary package as printed."""
    pkg = tmp_path / "steercmp_actadd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(_one("python", "# steercmp_actadd/__init__.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "steercmp_actadd", raising=False)
    module = importlib.import_module("steercmp_actadd")
    assert Path(module.__file__).parent == pkg
    yield module
    sys.modules.pop("steercmp_actadd", None)


def test_every_block_is_checked_here():
    """A new block kind needs a check in this file."""
    kinds = {kind for _, kind, _ in BLOCK.findall(DOC.read_text())}
    assert kinds <= {"python", "toml", "bash", "yaml"}, kinds
    assert len(blocks("python")) == 5, "a new python block needs a check in this file"


def test_the_plugin_and_its_tests_run(tutorial_plugin):
    namespace: dict = {}
    exec(compile(_one("python", "# tests/test_actadd.py"), "tutorial: tests/test_actadd.py", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()


def test_the_context_and_proposal_snippets_run_on_a_real_context(tutorial_plugin):
    from steercmp.api import Proposal
    from steercmp.lm.load import LoadedModel
    from steercmp.testing import (
        COUPLET_BATTERY,
        couplet_tokenizer,
        tiny_battery,
        tiny_contexts,
        tiny_model,
    )

    battery = tiny_battery(COUPLET_BATTERY)
    lm = LoadedModel(model=tiny_model(), tokenizer=couplet_tokenizer(), source="tiny", path="",
                     dtype=torch.float32, device="cpu")
    ctx = next(c for c in tiny_contexts(lm, battery) if c.prompt.id == "stream_dream")
    context_block = next(b for b in blocks("python") if b.startswith("ctx.prompt.id"))
    exec(compile(context_block, "tutorial: PromptContext", "exec"), {"ctx": ctx})
    proposal_block = next(b for b in blocks("python") if b.startswith("Proposal("))
    exec(compile(proposal_block, "tutorial: Proposal", "exec"), {"ctx": ctx, "torch": torch, "Proposal": Proposal})


def test_the_resources_snippet_defines_a_declared_resource():
    from steercmp.api import Resource

    snippet = next(b for b in blocks("python") if b.startswith("def resources"))
    namespace: dict = {"Resource": Resource, "load_probe": lambda path: path}
    exec(compile("class Probe:\n    options = {'path': 'probe.pt'}\n" + textwrap.indent(snippet, "    "),
                 "tutorial: resources()", "exec"), namespace)
    (probe,) = namespace["Probe"]().resources()
    assert probe.name == "probe" and probe.loader() == "probe.pt"


def test_the_entry_point_matches_the_example_package():
    printed = tomllib.loads(_one("toml", "# pyproject.toml"))
    example = tomllib.loads((ROOT / "examples" / "steercmp-actadd" / "pyproject.toml").read_text())
    assert printed["project"]["entry-points"]["steercmp"] == example["project"]["entry-points"]["steercmp"]


def test_the_experiment_loads_with_the_plugin(tutorial_plugin):
    from steercmp.config import Experiment
    from steercmp.plugin_manager import build_plugin_manager

    text = _one("yaml", "# experiments/mine.yaml")
    experiment = Experiment.from_dict(yaml.safe_load(text), source=str(ROOT / "experiments" / "mine.yaml"))
    plugins = build_plugin_manager(entry_points=False, extra=[tutorial_plugin])
    known = set(plugins.methods)
    assert {m.name for m in experiment.methods} <= known


def test_every_steercmp_command_exists():
    from steercmp.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse
    used = {line.split()[1] for b in blocks("bash") for line in b.splitlines()
            if line.startswith("steercmp ") and not line.split()[1].startswith("-")}
    assert used and used <= commands, used - commands
