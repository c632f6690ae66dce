"""Position rules: where to inject (the planning token) and where to score (the rhyme slot).

Rules are strings so batteries stay plain YAML:
``first_line_break`` (the token holding the first "\\n"), ``last``, ``token:N`` (absolute index,
negative from the end) and ``regex:PATTERN`` (the token where the single match starts).
A rule that matches nothing or several places is an error, never a silent guess.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from steercmp.errors import ConfigError

RULE_KINDS = ("first_line_break", "last", "token:N", "regex:PATTERN")


def check_rule_syntax(rule: str) -> None:
    """Validate a rule's spelling without a tokenizer (config validation, before models load)."""
    if rule in ("first_line_break", "last"):
        return
    if rule.startswith("token:"):
        try:
            int(rule.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"position rule {rule!r} needs an integer after 'token:'",
                              fix="write e.g. token:-1") from None
        return
    if rule.startswith("regex:"):
        try:
            re.compile(rule.split(":", 1)[1])
        except re.error as exc:
            raise ConfigError(f"position rule {rule!r} is not a valid regex ({exc})",
                              fix="escape special characters") from None
        return
    raise ConfigError(f"unknown position rule {rule!r}", fix=f"use one of {', '.join(RULE_KINDS)}")


def token_offsets(tokenizer, text: str, add_special_tokens: bool = True
                  ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character spans, tokenized in one step."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _token_at_char(offsets: Sequence[tuple[int, int]], char: int) -> int:
    for i, (start, end) in enumerate(offsets):
        if start <= char < end:
            return i
    raise ValueError(char)


def find_position(tokenizer, input_ids: Sequence[int], text: str, rule: str, *,
                  prefix: str = "", add_special_tokens: bool = True) -> int:
    """Return the absolute token index that ``rule`` names in ``text``.

    ``input_ids`` is ``prefix + text`` tokenized in one step (``prefix`` is a chat template's
    opening, which already holds BOS, so it is tokenized without special tokens). Text rules
    (line break, regex) look only inside ``text``.
    """
    check_rule_syntax(rule)
    n = len(input_ids)
    if rule == "last":
        return n - 1
    if rule.startswith("token:"):
        idx = int(rule.split(":", 1)[1])
        pos = idx if idx >= 0 else n + idx
        if not 0 <= pos < n:
            raise ConfigError(f"position rule {rule!r} is outside the prompt ({n} tokens)",
                              fix="use an index inside the prompt")
        return pos
    ids, offsets = token_offsets(tokenizer, prefix + text, add_special_tokens)
    if list(ids) != list(input_ids):
        raise ConfigError("prompt tokenization changed between calls",
                          fix="tokenize the prompt text once with special tokens")
    if rule == "first_line_break":
        starts = [text.index("\n")] if "\n" in text else []
        what = "a line break"
    else:
        starts = [m.start() for m in re.finditer(rule.split(":", 1)[1], text)]
        what = f"pattern {rule[6:]!r}"
    if len(starts) == 0:
        raise ConfigError(f"position rule {rule!r} matches nothing: the text has no {what}",
                          fix="end the first line with a line break or change the rule")
    if len(starts) > 1:
        raise ConfigError(f"position rule {rule!r} matches {len(starts)} places",
                          fix="make the pattern match exactly one place")
    try:
        return _token_at_char(offsets, len(prefix) + starts[0])
    except ValueError:
        raise ConfigError(f"position rule {rule!r} points inside no token",
                          fix="anchor the rule on visible text") from None
