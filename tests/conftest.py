"""Shared fixtures: tiny models from steercmp's conformance kit, and the real embedded model."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny():
    from steercmp.testing import tiny_model

    return tiny_model()


@pytest.fixture
def tiny_lm():
    from steercmp.lm.load import LoadedModel
    from steercmp.testing import couplet_tokenizer, tiny_model

    return LoadedModel(model=tiny_model(), tokenizer=couplet_tokenizer(), source="tiny", path="",
                       dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def embedded_lm():
    """The real Gemma 3 270M (converted once and cached); tests using it are marked slow."""
    from steercmp.lm.load import load_base_model

    return load_base_model(progress=False)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny checkpoint whose tokenizer knows the kit's couplet battery (whole-run tests)."""
    from steercmp.testing import COUPLET_BATTERY, battery_vocabulary, save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), words=battery_vocabulary(COUPLET_BATTERY))


#: test modules that run whole experiments (runner or CLI) on a tiny model: the ``integration``
#: tier (``nox -s tests-fast`` leaves them out; the README's command and CI run everything)
INTEGRATION_MODULES = frozenset({
    "commands/test_bad_inputs.py", "commands/test_partial_report.py", "plugins/nla/test_text_edit_controls.py",
    "plugins/test_example_plugin.py", "plugins/test_whole_run_example.py", "rehearsal/test_v3_rehearsal.py",
    "run/test_accelerate_launch.py", "run/test_arithmetic_floor.py", "run/test_determinism.py",
    "run/test_distributed.py", "run/test_faults.py",
    "run/test_match.py", "run/test_positive_control_drop.py", "run/test_resume.py", "run/test_runner.py",
    "run/test_safety.py", "run/test_schema.py",
    "report/test_report.py", "report/test_reference.py",
})


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's signature
    root = os.path.dirname(__file__)
    for item in items:
        rel = os.path.relpath(str(item.path), root).replace(os.sep, "/")
        if rel in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
