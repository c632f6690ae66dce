"""Prompts as tokens: tokenizing couplets, resolving position rules, word forms, padding.

Where to inject (the planning token) and where to score (the rhyme slot) are position rules
(:data:`steercmp.battery.RULE_KINDS`); a rule that matches nothing or several places is an
error, never a silent guess. A chat-templated prompt already holds BOS, so it is tokenized
without special tokens (a second BOS would shift every position).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from steercmp.api import Prompt
from steercmp.battery import Battery, check_rule_syntax
from steercmp.errors import ConfigError

_LINE_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


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
    elif rule == "first_line_end":
        words = list(_LINE_WORD.finditer(text.split("\n", 1)[0])) if "\n" in text else []
        starts = [words[-1].start()] if words else []
        what = "first line ending in a word"
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


def word_forms(word: str) -> tuple[str, ...]:
    """The surface forms a family word is scored under: with/without leading space, lower/capitalised."""
    lower, cap = word.lower(), word[:1].upper() + word[1:].lower()
    return tuple(dict.fromkeys((" " + lower, " " + cap, lower, cap)))


def encode_form(tokenizer, form: str) -> tuple[int, ...]:
    """Token ids of a surface form with no special tokens (Gemma has no leading-space prefix)."""
    return tuple(tokenizer(form, add_special_tokens=False)["input_ids"])


def tokenize_battery(battery: Battery, tokenizer, *, chat_template: bool = False,
                     require_single_token: bool = True) -> dict[str, TokenizedPrompt]:
    """Every prompt of ``battery`` tokenized once, as the run reads it (chat prefix, BOS), keyed by
    prompt id, after the tokenizer checks: family words known to the vocabulary (one token each
    unless ``require_single_token`` is off) and position rules that resolve. The preflight does
    this with the tokenizer alone; extraction and ``locate`` reuse the result."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out: dict[str, TokenizedPrompt] = {}
    for p in battery.prompts:
        where = f"{battery.source}: prompt {p.id}"
        for fam, words in p.families.items():
            for w in words:
                ids = encode_form(tokenizer, " " + w)
                if not ids or (unk is not None and unk in ids):
                    raise ConfigError(f"family word {w!r} is missing from the tokenizer's vocabulary",
                                      where=f"{where}.families.{fam}", fix="choose a word the model knows")
                if require_single_token and len(ids) != 1:
                    raise ConfigError(
                        f"family word {w!r} is not one token (' {w}' -> {len(ids)} tokens)",
                        where=f"{where}.families.{fam}",
                        fix="choose a single-token word or set single_token_families: false in the experiment")
        out[p.id] = tokenize_prompt(tokenizer, p, chat_template, where=where)
    return out


#: the user turn that asks an instruction model for the couplet (``model.chat_template: true``)
CHAT_INSTRUCTION = "Write a rhyming couplet."


def chat_prefix(tokenizer: Any, chat_template: bool) -> str:
    """The text before the couplet: nothing for base models; for instruction models one user
    turn asking for the couplet, then the model's turn, which the couplet text continues."""
    if not chat_template:
        return ""
    tok = tokenizer
    if not getattr(tok, "chat_template", None):
        raise ConfigError("model.chat_template is on but the tokenizer has no chat template",
                          where="model.chat_template", fix="set chat_template: false for base models")
    return tok.apply_chat_template(
        [{"role": "user", "content": CHAT_INSTRUCTION}], tokenize=False, add_generation_prompt=True)


class TokenizedPrompt(NamedTuple):
    """A prompt as the model sees it: ``ids`` (BOS or chat prefix included), the absolute index
    of the injection (planning) token and of the scoring slot (the token before the rhyme)."""

    ids: tuple[int, ...]
    inject_pos: int
    score_pos: int


def tokenize_text(tokenizer: Any, text: str, chat_template: bool = False) -> tuple[tuple[int, ...], str]:
    """``(ids, prefix)``: ``text`` tokenized in one step after the chat prefix (if any)."""
    prefix = chat_prefix(tokenizer, chat_template)
    ids = tuple(tokenizer(prefix + text, add_special_tokens=not chat_template)["input_ids"])
    return ids, prefix


def resolve_rule(tokenizer: Any, ids: Sequence[int], text: str, rule: str, *, prefix: str = "",
                 chat_template: bool = False) -> int:
    """:func:`find_position` for ``ids`` made by :func:`tokenize_text`."""
    return find_position(tokenizer, ids, text, rule, prefix=prefix, add_special_tokens=not chat_template)


def tokenize_prompt(tokenizer: Any, prompt: Prompt, chat_template: bool = False,
                    text: str | None = None, *, where: str | None = None) -> TokenizedPrompt:
    """Token ids, injection position and scoring position for a prompt (or an override text
    scored under the prompt's own position rules). With ``where`` (the prompt's place in its
    battery) a rule that does not resolve is reported at ``<where>.inject`` or ``<where>.score``."""
    body = text if text is not None else prompt.text
    ids, prefix = tokenize_text(tokenizer, body, chat_template)
    found = []
    for field, rule in (("inject", prompt.inject), ("score", prompt.score)):
        try:
            found.append(resolve_rule(tokenizer, ids, body, rule, prefix=prefix, chat_template=chat_template))
        except ConfigError as exc:
            if where is None:
                raise
            raise ConfigError(exc.message, where=f"{where}.{field}", fix=exc.fix) from None
    return TokenizedPrompt(ids, found[0], found[1])


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token sequences; returns ``input_ids``, ``attention_mask`` and each row's shift
    (how far its tokens moved right: nonzero only for left padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    shift = torch.zeros(len(sequences), dtype=torch.long)
    for i, s in enumerate(sequences):
        n = len(s)
        if side == "left":
            ids[i, width - n:] = torch.as_tensor(list(s))
            mask[i, width - n:] = 1
            shift[i] = width - n
        else:
            ids[i, :n] = torch.as_tensor(list(s))
            mask[i, :n] = 1
    return ids, mask, shift
