"""Tiny Gemma 3 models and tokenizers built from configs (small vocabulary) for fast tests."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
BASE_WORDS = ("the a and i in to of my with down by over all every is was on at it his her "
              "their beside slowly quiet came out fill night stars window glowed golden closed eyes "
              "drifted wandered stream dream seem gleam beam stone bone light bright white sight rain "
              "pain through heard sang bird word hill still fire desire").split()


def build_cfg(**overrides) -> Gemma3TextConfig:
    """A ~200k-parameter Gemma 3 text config; override any field."""
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, vocab_size=512, max_position_embeddings=256,
               sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
               pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager")
    cfg.update(overrides)
    return Gemma3TextConfig(**cfg)


def tiny_model(seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(build_cfg(**overrides)).eval()
    with torch.no_grad():  # random init is near-zero; widen it so layers actually mix
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def tiny_tokenizer(words: Iterable[str] = (), vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A word-level tokenizer in Gemma's style: ' dream' -> '▁dream', '\\n' its own token."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    pieces = ["\n", ",", ".", "!", "?", "'"]
    for w in list(BASE_WORDS) + [w.lower() for w in words]:
        for form in (w, w.capitalize(), "▁" + w, "▁" + w.capitalize()):
            pieces.append(form)
    for p in pieces:
        if p not in vocab and len(vocab) < vocab_size:
            vocab[p] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n|[,.!?']"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    return fast


def save_tiny_checkpoint(path: Path, words: Iterable[str] = (), seed: int = 0, **overrides) -> Path:
    """Write a tiny model + tokenizer directory loadable by ``steercmp.models.load_base_model``."""
    model = tiny_model(seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(words, vocab_size=model.config.vocab_size).save_pretrained(path)
    return path


def words_of(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text.lower())
