"""Tiny Gemma 3 models and tokenizers built from configs (small vocabulary) for fast tests."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from steercmp import testing

BASE_WORDS = ("the a and i in to of my with down by over all every is was on at it his her "
              "their beside slowly quiet came out fill night stars window glowed golden closed eyes "
              "drifted wandered stream dream seem gleam beam stone bone light bright white sight rain "
              "pain through heard sang bird word hill still fire desire").split()


def build_cfg(**overrides) -> Gemma3TextConfig:
    """The kit's tiny Gemma 3 text config; override any field."""
    return testing.tiny_config(**overrides)


def tiny_model(seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    """The conformance kit's tiny random model (one builder for the kit and the suite)."""
    return testing.tiny_model(seed, **overrides)


def tiny_tokenizer(words: Iterable[str] = (), vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """The kit's word-level Gemma-style tokenizer over BASE_WORDS plus ``words``."""
    return testing.tiny_tokenizer([*BASE_WORDS, *words], vocab_size=vocab_size)


def save_tiny_checkpoint(path: Path, words: Iterable[str] = (), seed: int = 0, **overrides) -> Path:
    """Write a tiny model + tokenizer directory loadable by ``steercmp.models.load_base_model``."""
    model = tiny_model(seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(words, vocab_size=model.config.vocab_size).save_pretrained(path)
    return path


def words_of(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text.lower())
