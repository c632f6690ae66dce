"""Counterfactual couplets, token for token: the first candidate line-end word
(:mod:`steercmp.couplets`) whose couplet keeps the prompt's length and positions.

A counterfactual replaces only the word that ends the first line, so every other token and both
positions (the planning line break and the scoring slot) stay where they are, and a residual at
any position can be patched from one run into the other.

Limits: a counterfactual must tokenize to the same length (a word of another length is skipped;
if none fits, :class:`NoCounterfactual` says so, and the positive control drops that prompt); ``swap`` can lower the target (a rhyme rarely repeats the
line's own word); ``cue`` and ``block`` move the plan away from the original, not only toward the
target, so "the score moved" is evidence of a plan at that site, not of a specific word.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from steercmp.api import Prompt
from steercmp.couplets import CONSTRUCTIONS, candidate_words, default_construction, swap_line_end
from steercmp.errors import ConfigError
from steercmp.lm.prompts import TokenizedPrompt, tokenize_prompt


class NoCounterfactual(ConfigError):
    """No candidate couplet of a prompt keeps its token length and positions: a fact about one
    prompt under this tokenizer, not a broken config, so a method may drop the prompt and go on."""


@attrs.frozen
class Counterfactual:
    """One counterfactual couplet for one prompt and target family."""

    prompt_id: str
    family: str
    construction: str
    word: str
    text: str
    tokens: TokenizedPrompt
    first_diff: int  # the first token that differs from the original prompt


def build_counterfactual(tokenizer, prompt: Prompt, family: str, construction: str | None = None, *,
                         chat_template: bool = False, where: str = "battery") -> Counterfactual:
    """The first candidate of ``construction`` that keeps the prompt's length and positions.

    Raises :class:`NoCounterfactual` (a :class:`ConfigError`) naming the prompt's family when no
    candidate fits; an unknown construction is a plain :class:`ConfigError`."""
    construction = construction or default_construction(prompt, family)
    if construction not in CONSTRUCTIONS:
        raise ConfigError(f"unknown counterfactual construction {construction!r}", where=where,
                          fix=f"use one of {', '.join(CONSTRUCTIONS)}")
    orig = tokenize_prompt(tokenizer, prompt, chat_template)
    tried: list[str] = []
    for word in candidate_words(prompt, family, construction):
        text = swap_line_end(prompt.text, word)
        if text is None or word.lower() == prompt.line_end_word:
            continue
        tried.append(word)
        try:
            tok = tokenize_prompt(tokenizer, prompt, chat_template, text=text)
        except ConfigError:
            continue
        if len(tok.ids) == len(orig.ids) and (tok.inject_pos, tok.score_pos) == (orig.inject_pos, orig.score_pos):
            diff = next(i for i, (a, b) in enumerate(zip(orig.ids, tok.ids, strict=True)) if a != b)
            return Counterfactual(prompt.id, family, construction, word, text, tok, diff)
        if len(tried) >= 40:
            break
    raise NoCounterfactual(
        f"no {construction} counterfactual of prompt {prompt.id!r} toward {family!r} tokenizes to the "
        f"prompt's length (tried {', '.join(tried[:6]) or 'no word'})",
        where=f"{where}: prompt {prompt.id}.families.{family}",
        fix="give the prompt a line-end word that tokenizes like the candidates, or set meta.cue."
            f"{family} to a word of the same token length")


def counterfactuals(tokenizer, prompts: Sequence[Prompt], family: str, construction: str | None = None, *,
                    chat_template: bool = False, where: str = "battery") -> list[Counterfactual]:
    return [build_counterfactual(tokenizer, p, family, construction, chat_template=chat_template, where=where)
            for p in prompts]


__all__ = ["Counterfactual", "NoCounterfactual", "build_counterfactual", "counterfactuals"]
