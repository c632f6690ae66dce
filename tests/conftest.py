import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny():
    from tiny import tiny_model

    return tiny_model()


@pytest.fixture
def tiny_lm():
    from tiny import tiny_model, tiny_tokenizer

    from steercmp.models import LoadedModel

    return LoadedModel(model=tiny_model(), tokenizer=tiny_tokenizer(), source="tiny", path="",
                       dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def embedded_lm():
    """The real Gemma 3 270M (converted once and cached); tests using it are marked slow."""
    from steercmp.models import load_base_model

    return load_base_model(progress=False)
