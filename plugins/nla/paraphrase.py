"""Meaning-preserving rewordings of an explanation: the ``paraphrase_edit`` control's text.

A text edit is semantic only if it beats a neutral rewording that moves the reconstruction about
as far. The rewording comes from a deterministic rule set (phrase -> phrase, whole words,
case-insensitive, first letter's case kept), applied in order; a rule that would add or remove a
mention of an editable term is skipped, so the plan the explanation names is the same before and
after. Rules are chosen before any run (the defaults reword the framing of an explanation, never
its content words); a user may give their own.

Rules, not the AV's other samples: the other samples differ in content as well as wording, and
on small pairs often name other plan words, so they would not isolate wording.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from steercmp.api import ConfigError

from .editing import match_case, mentions

#: phrase -> rewording, applied in this order; framing words only (no rhyme or plan words)
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    ("the line ends with", "the last word of the line is"),
    ("so the next line should rhyme with", "which means the following line ought to rhyme with"),
    ("the next line", "the following line"),
    ("should", "ought to"),
    ("planning", "aiming for"),
    ("plans", "intends"),
    ("likely", "probably"),
    ("the model", "the network"),
    ("predicts", "expects"),
    ("about", "concerning"),
    ("because", "since"),
    ("also", "as well"),
)


def parse_rules(value: object, where: str) -> tuple[tuple[str, str], ...]:
    """Rules from an experiment option: ``None`` (the defaults), or a mapping / list of pairs.

    A rule whose rewording equals its phrase (ignoring case) would leave every text unchanged:
    a :class:`ConfigError`, as is an empty phrase or a non-string.
    """
    if value is None:
        return DEFAULT_RULES
    pairs: list[tuple[object, object]]
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        pairs = [tuple(p) if isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 else (p, None)
                 for p in value]
    else:
        raise ConfigError(f"paraphrase_rules must be a mapping of phrase: rewording, got {type(value).__name__}",
                          where=where, fix="write e.g. {'the line ends with': 'the last word of the line is'}")
    if not pairs:
        raise ConfigError("paraphrase_rules is empty: no explanation could be reworded", where=where,
                          fix="give at least one rule, or leave the option out for the defaults")
    rules = []
    for phrase, new in pairs:
        if not isinstance(phrase, str) or not isinstance(new, str) or not phrase.strip() or not new.strip():
            raise ConfigError(f"paraphrase rule {phrase!r} -> {new!r} must map a non-empty phrase to a "
                              "non-empty rewording", where=where, fix="use strings on both sides")
        if phrase.strip().lower() == new.strip().lower():
            raise ConfigError(f"paraphrase rule {phrase!r} -> {new!r} leaves the text unchanged", where=where,
                              fix="give a different rewording or remove the rule")
        rules.append((phrase.strip(), new.strip()))
    return tuple(rules)


def _sub(text: str, phrase: str, new: str) -> str:
    pat = re.compile(rf"(?<![\w-]){re.escape(phrase)}(?![\w])", re.IGNORECASE)
    return pat.sub(lambda m: match_case(m.group(0), new), text)


def paraphrase(text: str, rules: Sequence[tuple[str, str]], keep_terms: Iterable[str]) -> tuple[str, list[str]]:
    """``(reworded text, phrases applied)``; the text is unchanged when no rule applies.

    A rule is skipped when it changes which editable terms the text mentions (or how often).
    """
    terms = sorted({t.lower() for t in keep_terms})
    before = sorted(mentions(text, terms))
    applied = []
    for phrase, new in rules:
        out = _sub(text, phrase, new)
        if out != text and sorted(mentions(out, terms)) == before:
            text = out
            applied.append(phrase)
    return text, applied
