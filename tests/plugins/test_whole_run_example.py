"""The whole-run example of docs/plugins.md, run as printed there (the kit's helpers with their
defaults), and a check that the page still prints this code."""

from pathlib import Path

import pytest

from steercmp.testing import run_experiment, save_tiny_checkpoint, write_tiny_experiment

pytestmark = pytest.mark.integration
DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def test_whole_run(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "model")
    exp = write_tiny_experiment(tmp_path, model, methods=["unembed_direction"])  # your method's name here
    runner, cells = run_experiment(exp, tmp_path / "run")
    assert not runner.failures
    assert cells.filter(cells["condition"] == "target_edit")["score"].is_not_null().all()


def test_the_page_prints_this_example():
    source = Path(__file__).read_text()
    example = source[source.index("def test_whole_run(tmp_path):"):source.index("\n\n\ndef test_the_page")]
    assert example in DOC.read_text()
