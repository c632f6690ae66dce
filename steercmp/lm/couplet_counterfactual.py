"""Counterfactual couplets: the same couplet with its rhyme plan changed, token for token.

A counterfactual replaces only the word that ends the first line, so every other token and both
positions (the planning line break and the scoring slot) stay where they are, and a residual at
any position can be patched from one run into the other. Three constructions, each aimed at one
target family (the family the plan should move to):

- ``cue`` (rhyme-sound change): line 1 ends with a word that rhymes with the target family but
  is in no family, so the plan moves to the target's rhyme sound (``stream`` -> ``cone`` for a
  target ``stone, bone``). Used when the target does not rhyme with the original.
- ``swap`` (same-rhyme word swap, the research note's dream -> gleam): line 1 ends with a word of
  the target family itself.
- ``block`` (same rhyme): line 1 ends with the original plan word, which a couplet does not
  repeat, so the plan moves to the other words of the same rhyme, the target family among them.

Limits: a counterfactual must tokenize to the same length (a word of another length is skipped;
if none fits the prompt is refused); ``swap`` can lower the target (a rhyme rarely repeats the
line's own word); ``cue`` and ``block`` move the plan away from the original, not only toward the
target, so "the score moved" is evidence of a plan at that site, not of a specific word.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

from steercmp.api import Prompt
from steercmp.errors import ConfigError
from steercmp.lm.prompts import TokenizedPrompt, tokenize_prompt
from steercmp.rhymes import rhyme_group, rhyme_part

CONSTRUCTIONS = ("cue", "swap", "block")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


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


def swap_line_end(text: str, word: str) -> str | None:
    """``text`` with the last word of its first line replaced by ``word`` (None without one)."""
    first, sep, rest = text.partition("\n")
    matches = list(_WORD.finditer(first))
    if not matches or not sep:
        return None
    m = matches[-1]
    return first[: m.start()] + word + first[m.end():] + sep + rest


def same_rhyme(prompt: Prompt, family: str) -> bool:
    """Whether ``family`` rhymes with the original family (the prompt's plan)."""
    orig = {rhyme_part(w) for w in prompt.families["original"]} - {None}
    fam = {rhyme_part(w) for w in prompt.families[family]} - {None}
    return bool(orig & fam)


def default_construction(prompt: Prompt, family: str) -> str:
    """``swap`` for a target that rhymes with the original, ``cue`` otherwise."""
    return "swap" if same_rhyme(prompt, family) else "cue"


def candidate_words(prompt: Prompt, family: str, construction: str) -> list[str]:
    """Line-end words for a construction, in preference order (``meta.cue.<family>`` first)."""
    fams = prompt.families
    used = {w.lower() for ws in fams.values() for w in ws} | {prompt.line_end_word}
    if construction == "swap":
        return list(fams[family])
    if construction == "block":
        return list(fams["original"])
    cue = dict(prompt.meta.get("cue") or {}).get(family)
    words = [cue] if isinstance(cue, str) and cue else []
    for anchor in fams[family]:
        words += [w for w in rhyme_group(anchor) if w not in used]
    return list(dict.fromkeys(words))


def build_counterfactual(tokenizer, prompt: Prompt, family: str, construction: str | None = None, *,
                         chat_template: bool = False, where: str = "battery") -> Counterfactual:
    """The first candidate of ``construction`` that keeps the prompt's length and positions.

    Raises :class:`ConfigError` naming the prompt's family when no candidate fits."""
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
    raise ConfigError(
        f"no {construction} counterfactual of prompt {prompt.id!r} toward {family!r} tokenizes to the "
        f"prompt's length (tried {', '.join(tried[:6]) or 'no word'})",
        where=f"{where}: prompt {prompt.id}.families.{family}",
        fix="give the prompt a line-end word that tokenizes like the candidates, or set meta.cue."
            f"{family} to a word of the same token length")


def counterfactuals(tokenizer, prompts: Sequence[Prompt], family: str, construction: str | None = None, *,
                    chat_template: bool = False, where: str = "battery") -> list[Counterfactual]:
    return [build_counterfactual(tokenizer, p, family, construction, chat_template=chat_template, where=where)
            for p in prompts]


__all__ = ["CONSTRUCTIONS", "Counterfactual", "build_counterfactual", "candidate_words", "counterfactuals",
           "default_construction", "same_rhyme", "swap_line_end"]
