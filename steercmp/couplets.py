"""Counterfactual couplets as text: the same couplet with the word that ends its first line
replaced, so its rhyme plan changes and nothing else does.

Three constructions, each aimed at one target family (the family the plan should move to):

- ``cue`` (rhyme-sound change): line 1 ends with a word that rhymes with the target family but
  is in no family, so the plan moves to the target's rhyme sound (``stream`` -> ``cone`` for a
  target ``stone, bone``). Used when the target does not rhyme with the original.
- ``swap`` (same-rhyme word swap, the research note's dream -> gleam): line 1 ends with a word of
  the target family itself.
- ``block`` (same rhyme): line 1 ends with the original plan word, which a couplet does not
  repeat, so the plan moves to the other words of the same rhyme, the target family among them.

This module is text only, beside the battery it reads; which candidate keeps the prompt's token
length is decided with a tokenizer in :mod:`steercmp.lm.couplet_counterfactual`.
"""

from __future__ import annotations

import re

from steercmp.api import Prompt
from steercmp.rhymes import rhyme_group, rhyme_part

CONSTRUCTIONS = ("cue", "swap", "block")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


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


__all__ = ["CONSTRUCTIONS", "candidate_words", "default_construction", "same_rhyme", "swap_line_end"]
