"""AV/AR inference against independent recomputations on tiny released-layout checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from steercmp.errors import ConfigError, NumericalError
from steercmp_plugins.nla import tiny_pair as tiny
from steercmp_plugins.nla.ar import ActivationReconstructor, ar_prompt_ids
from steercmp_plugins.nla.av import ActivationVerbalizer, av_prompt_ids, parse_explanation
from steercmp_plugins.nla.meta import NlaMeta


@pytest.fixture(scope="module")
def av(pair_dir):
    return ActivationVerbalizer.load(pair_dir[0])


@pytest.fixture(scope="module")
def ar(pair_dir):
    return ActivationReconstructor.load(pair_dir[1])


def test_injection_site_and_scale_match_independent_recomputation(av):
    tok = av.lm.tokenizer
    tokens = tok.convert_ids_to_tokens(list(av.prompt_ids))
    # independent: the prompt text rendered by hand, tokenized without adding specials again
    content = tiny.AV_TEMPLATE.format(injection_char=tiny.INJ)
    text = f"<bos><start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
    expected = tok(text, add_special_tokens=False)["input_ids"]
    assert list(av.prompt_ids) == expected
    assert tokens.count("<bos>") == 1 and tokens[0] == "<bos>"
    assert av.site == tokens.index(tiny.INJ)
    assert tokens[av.site - 1] == "<concept>" and tokens[av.site + 1] == "</concept>"

    v = torch.randn(2, 64, dtype=torch.float64) * 1000
    emb = av.inputs_embeds(v)
    weight = av.lm.model.get_input_embeddings().weight.detach()
    manual = weight[torch.tensor(expected)] * math.sqrt(64)  # Gemma's scale, applied ONCE
    for row in range(2):
        others = [i for i in range(len(expected)) if i != av.site]
        torch.testing.assert_close(emb[row, others], manual[others], rtol=1e-5, atol=1e-5)
        want = (v[row].float() / v[row].float().norm() * 50.0).to(emb.dtype)
        torch.testing.assert_close(emb[row, av.site], want)
        assert float(emb[row, av.site].norm()) == pytest.approx(50.0, rel=1e-5)


def test_double_bos_trap(pair_dir):
    tok = tiny.make_tokenizer()
    meta = NlaMeta.from_yaml(pair_dir[0])
    ids = av_prompt_ids(tok, meta)
    assert ids.count(tok.bos_token_id) == 1
    # the trap: rendering the template to text and tokenizing with specials adds a second BOS
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                   add_generation_prompt=True)
    naive = tok(text)["input_ids"]
    assert naive[:2] == [tok.bos_token_id, tok.bos_token_id]
    # a chat template that itself doubles BOS is refused
    bad = tiny.make_tokenizer(chat_template="{{ bos_token }}" + tiny.CHAT)
    with pytest.raises(ConfigError, match="two BOS"):
        av_prompt_ids(bad, meta)


def test_neighbour_check(make_pair):
    av_dir, _ = make_pair(av_meta_overrides={"tokens.injection_left_neighbor_id": 7})
    with pytest.raises(ConfigError, match="injection site") as err:
        ActivationVerbalizer.load(av_dir)
    assert "injection_left_neighbor_id" in str(err.value)


def test_sidecar_tokenizer_mismatch(make_pair):
    av_dir, _ = make_pair(av_meta_overrides={"tokens.injection_token_id": 9})
    with pytest.raises(ConfigError, match="tokens.injection_token_id"):
        ActivationVerbalizer.load(av_dir)


def test_sidecar_d_model_mismatch(make_pair):
    av_dir, ar_dir = make_pair(ar_meta_overrides={"d_model": 32})
    with pytest.raises(ConfigError, match="d_model"):
        ActivationReconstructor.load(ar_dir)


def test_ar_suffix_mismatch(make_pair):
    _, ar_dir = make_pair(ar_meta_overrides={"tokens.critic_suffix_ids": [5, 6, 7]})
    with pytest.raises(ConfigError, match="critic_suffix_ids"):
        ActivationReconstructor.load(ar_dir)


def test_ar_layer_count_mismatch(make_pair):
    _, ar_dir = make_pair(ar_meta_overrides={"ar.num_hidden_layers": 3,
                                             "extraction_layer_index": 3})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ActivationReconstructor.load(ar_dir)


def test_generation_matches_uncached_greedy_loop(av):
    v = torch.randn(2, 64)
    got = av.generate_raw(v, generators=None, greedy=True, max_new_tokens=6)
    model, tok = av.lm.model, av.lm.tokenizer
    for row in range(2):
        emb = av.inputs_embeds(v[row])
        produced = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(inputs_embeds=emb).logits[0, -1].argmax())
            if nxt in av.stop_ids:
                break
            produced.append(nxt)
            emb = torch.cat([emb, model.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        assert got[row] == tok.decode(produced, skip_special_tokens=True)


def test_sampling_is_seeded_per_row(av):
    v = torch.randn(3, 64)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    a = av.generate_raw(v, generators=gens(), temperature=1.0, max_new_tokens=5)
    b = av.generate_raw(v[[0]], generators=gens()[:1], temperature=1.0, max_new_tokens=5)
    assert a[0] == b[0]  # a row's text does not depend on its batch
    with pytest.raises(NumericalError):
        av.inputs_embeds(torch.zeros(64))


def test_ar_bos_and_last_token_readout(ar, pair_dir):
    tok = ar.lm.tokenizer
    ids = ar.prompt_ids("the stream")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # a tokenizer that does not add BOS still gets exactly one
    meta = NlaMeta.from_yaml(pair_dir[1])
    no_bos = tiny.make_tokenizer(add_bos=False)
    assert ar_prompt_ids(no_bos, meta, "the stream") == ids

    texts = ["the stream", "the line ends with dream , planning seem or gleam"]
    got = ar.reconstruct(texts)
    head = load_file(str(pair_dir[1] / "value_head.safetensors"))["weight"]
    from transformers import Gemma3ForCausalLM

    full = Gemma3ForCausalLM.from_pretrained(pair_dir[1]).eval()
    for i, t in enumerate(texts):
        store = []
        h = full.model.layers[-1].register_forward_hook(
            lambda m, inp, out, store=store: store.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            full(torch.tensor([ar_prompt_ids(tok, meta, t)]))
        h.remove()
        want = store[0][0, -1] @ head.T  # last block output, no final norm, then the head
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)


def test_parse_explanation():
    assert parse_explanation("x <explanation>\n dream </explanation> y") == ("dream", True)
    assert parse_explanation("<explanation> planning dream or") == ("planning dream or", False)
    assert parse_explanation("no tags") == ("no tags", False)
