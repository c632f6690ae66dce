"""Model loading, the decoder-block resolver for both Gemma 3 classes, and real unloading."""

import gc
import weakref

import pytest
import torch

from steercmp.errors import ConfigError
from steercmp.lm.load import decoder_layers, load_base_model, release
from steercmp.lm.memory import rss_bytes
from steercmp.testing import couplet_tokenizer as tiny_tokenizer
from steercmp.testing import save_tiny_checkpoint
from steercmp.testing import tiny_config as build_cfg


def test_load_local_dir_and_unload_releases(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "m", words=())
    lm = load_base_model(str(path), dtype="float32", device="cpu", progress=False)
    assert type(lm.model).__name__ == "Gemma3ForCausalLM" and lm.num_layers == 4 and lm.d_model == 64
    assert not any(p.requires_grad for p in lm.model.parameters())
    ref = weakref.ref(lm.model)
    lm.unload()
    gc.collect()
    assert ref() is None and lm.model is None


def test_bf16_option(tmp_path):
    lm = load_base_model(str(save_tiny_checkpoint(tmp_path / "m", words=())), dtype="bf16", progress=False)
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_multimodal_checkpoint_loads_as_conditional_generation(tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=build_cfg().to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(tmp_path / "mm")
    tiny_tokenizer().save_pretrained(tmp_path / "mm")
    lm = load_base_model(str(tmp_path / "mm"), progress=False)
    assert type(lm.model).__name__ == "Gemma3ForConditionalGeneration"
    assert lm.layers is decoder_layers(lm.model) and lm.num_layers == 4 and lm.d_model == 64


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="model.id"):
        load_base_model(str(tmp_path / "nothing-here"), progress=False)


@pytest.mark.slow
def test_embedded_model_loads_and_unloading_frees_memory(embedded_lm):
    assert type(embedded_lm.model).__name__ == "Gemma3ForCausalLM"
    assert embedded_lm.num_layers == 18 and embedded_lm.d_model == 640
    start = rss_bytes()
    lm = load_base_model(progress=False)
    total = sum(float(p.sum()) for p in lm.model.parameters())  # touch every page
    assert total == total
    held = rss_bytes() - start
    ref = weakref.ref(lm.model)
    lm.unload()
    release(None)
    assert ref() is None
    kept = rss_bytes() - start
    assert held > 0.8 * 2**30, f"the loaded model held only {held / 2**30:.2f} GiB"
    assert kept < 0.25 * held, f"unloading kept {kept / 2**30:.2f} of {held / 2**30:.2f} GiB"
