"""Block surgery for builders: the last block run at chosen positions equals the whole block there."""

from __future__ import annotations

import torch

from steercmp.lm.blocks import last_block_at, top_blocks_only
from steercmp.testing import tiny_model


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(seed))


def test_last_block_at_equals_the_whole_block_at_those_positions() -> None:
    model = tiny_model()
    x = _inputs()
    rows, cols = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([6, 2, 4, 0, 5])
    with torch.no_grad(), top_blocks_only(model, 1) as top:
        whole = top(inputs_embeds=x, use_cache=False).last_hidden_state[rows, cols]
        with last_block_at(model, rows, cols):
            part = top(inputs_embeds=x, use_cache=False).last_hidden_state
    assert part.shape == (1, 5, 64)
    torch.testing.assert_close(part[0], whole, rtol=1e-5, atol=1e-5)


def test_gradients_match_and_the_block_is_restored() -> None:
    model = tiny_model()
    x = _inputs(2)
    rows, cols = torch.arange(3), torch.tensor([6, 3, 5])
    weights = list(model.get_decoder().layers[-1].mlp.parameters())
    grads = []
    for partial in (False, True):
        model.zero_grad()
        with top_blocks_only(model, 2) as top:
            if partial:
                with last_block_at(model, rows, cols):
                    out = top(inputs_embeds=x, use_cache=False).last_hidden_state[0]
            else:
                out = top(inputs_embeds=x, use_cache=False).last_hidden_state[rows, cols]
        out.square().sum().backward()
        grads.append([w.grad.clone() for w in weights])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert "forward" not in vars(model.get_decoder().layers[-1])
    assert model(input_ids=torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 512)


def test_a_block_of_another_layout_runs_whole_and_is_indexed() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).eval()
    assert not hasattr(model.get_decoder().layers[-1], "pre_feedforward_layernorm")
    ids = torch.tensor([[5, 9, 3, 7], [1, 2, 8, 4]])
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2])
    with torch.no_grad():
        whole = model(input_ids=ids).logits[rows, cols]
        with last_block_at(model, rows, cols):
            part = model(input_ids=ids).logits
    torch.testing.assert_close(part[0], whole, rtol=1e-5, atol=1e-5)
