"""Choosing the explanation to edit, and editing it.

Selection (recorded per prompt): ``default`` (the note's rule) takes the best reconstruction
among explanations that mention an editable term (a key of the prompt's edit map), else the best
reconstruction overall (``fallback``); ``strict`` drops prompts without an editable explanation.
Edits replace whole words only and keep the case pattern of the word they replace.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

SELECTIONS = ("default", "strict")


def _pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    words = sorted({w for w in words if w}, key=lambda w: (-len(w), w))
    if not words:
        return None
    alternation = "|".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![\w-])({alternation})(?![\w])", re.IGNORECASE)


def mentions(text: str, words: Iterable[str]) -> list[str]:
    """The words (lower case, in order of appearance) that ``text`` contains as whole words."""
    pat = _pattern(words)
    return [] if pat is None else [m.group(1).lower() for m in pat.finditer(text)]


def match_case(source: str, replacement: str) -> str:
    """Give ``replacement`` the case pattern of ``source`` (UPPER, Title, lower)."""
    if len(source) > 1 and source.isupper():
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def apply_edit(text: str, edit_map: Mapping[str, str]) -> tuple[str, int]:
    """Replace every whole-word, case-insensitive occurrence of each key; ``(new_text, count)``.

    One pass over the text, longest keys first, so replacements are never re-edited
    (``{dream: gleam, gleam: dream}`` swaps).
    """
    lookup = {k.lower(): v for k, v in edit_map.items()}
    pat = _pattern(lookup)
    if pat is None:
        return text, 0
    count = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return match_case(m.group(1), lookup[m.group(1).lower()])

    return pat.sub(sub, text), count


def spelled_ending(word: str) -> str:
    """The spelled rhyme ending an explanation may name: last vowel group and what follows
    (``stream -> eam``), the form the mini pair's explanations use."""
    m = re.search(r"[aeiouy]+[^aeiouy]*e?$", word.lower())
    return m.group(0) if m else word.lower()


def select_explanation(explanations: Sequence[str], scores: Sequence[float],
                       editable_terms: Iterable[str], rule: str = "default"
                       ) -> tuple[str, int | None]:
    """``(selection, index)``: ``editable`` / ``fallback`` / ``dropped`` and the chosen sample.

    ``scores`` are higher-is-better (fve_nrm, or -mse_nrm); NaN scores rank last. Ties keep the
    lower sample index.
    """
    if rule not in SELECTIONS:
        raise ValueError(f"unknown selection rule {rule!r}")
    terms = list(editable_terms)

    def best(indices: list[int]) -> int | None:
        if not indices:
            return None
        return max(indices, key=lambda i: (-math.inf if math.isnan(scores[i]) else scores[i], -i))

    editable = [i for i, e in enumerate(explanations) if mentions(e, terms)]
    if editable:
        return "editable", best(editable)
    if rule == "strict" or not explanations:
        return "dropped", None
    return "fallback", best(list(range(len(explanations))))
