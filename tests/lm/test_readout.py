"""One final-norm gain for the text-only Gemma 3 and for the 12B/27B multimodal wrapper.

The unembed baseline once read ``model.model.norm``, which is None on the wrapper, and silently
dropped Gemma's (1 + w) gain there; both models must now give the same directions."""

import torch

from steercmp.lm.load import LoadedModel
from steercmp.lm.readout import final_norm, final_norm_gain, readout_directions
from steercmp.testing import couplet_tokenizer, tiny_config, tiny_model


def _wrapper(text_model):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=tiny_config().to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    mm = Gemma3ForConditionalGeneration(cfg).eval()
    lm_layers = mm.model.language_model
    lm_layers.load_state_dict(text_model.model.state_dict())
    mm.lm_head.load_state_dict(text_model.lm_head.state_dict())
    return mm


def test_gain_is_one_plus_weight_on_both_layouts():
    text = tiny_model()
    with torch.no_grad():
        text.model.norm.weight.copy_(torch.linspace(-0.5, 0.5, text.config.hidden_size))
    mm = _wrapper(text)
    assert getattr(mm.model, "norm", None) is None  # the wrapper has no model.norm
    assert final_norm(mm) is mm.model.language_model.norm
    expected = 1.0 + text.model.norm.weight.detach()
    assert torch.allclose(final_norm_gain(text), expected) and torch.allclose(final_norm_gain(mm), expected)


def test_readout_directions_agree_across_layouts():
    text = tiny_model()
    with torch.no_grad():
        text.model.norm.weight.copy_(torch.linspace(-0.5, 0.5, text.config.hidden_size))
    tok = couplet_tokenizer()
    a = readout_directions(LoadedModel(text, tok, "t", "", torch.float32, "cpu"), ["dream", "gleam"])
    b = readout_directions(LoadedModel(_wrapper(text), tok, "t", "", torch.float32, "cpu"), ["dream", "gleam"])
    assert torch.allclose(a, b)
    row = text.lm_head.weight[tok.encode(" dream", add_special_tokens=False)[0]]
    assert torch.allclose(a[0], row * (1.0 + text.model.norm.weight))


def _models():
    from transformers import LlamaConfig, LlamaForCausalLM

    text = tiny_model(seed=3)
    capped = tiny_model(seed=3, final_logit_softcapping=2.0)  # Gemma 2's cap, small enough to matter
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    return {"gemma3": text, "gemma3_softcapped": capped, "gemma3_multimodal": _wrapper(text), "llama": llama}


def test_deferred_projection_equals_the_models_own_logits():
    """The sweep projects final hidden states itself (readout_skipped, then project_to_vocab):
    the logits must be the model's own, soft cap included where the model applies one and left
    out where it does not (transformers' multimodal Gemma 3 wrapper)."""
    from steercmp.lm.hooks import readout_skipped
    from steercmp.lm.readout import project_to_vocab

    ids = torch.randint(5, 400, (2, 7))
    for name, model in _models().items():
        with torch.no_grad():
            want = model(input_ids=ids, logits_to_keep=3).logits
            with readout_skipped(model) as store:
                model(input_ids=ids, logits_to_keep=3)
            got = project_to_vocab(model, store[0])
        assert torch.equal(got, want), name
    assert (want.abs() > 0).all()
    capped = _models()["gemma3_softcapped"]
    with torch.no_grad():
        assert capped(input_ids=ids).logits.abs().max() <= 2.0
