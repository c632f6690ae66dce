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
