"""The mini pair's data: training couplets, held-out battery prompts, templated explanations,
and the gold vectors (the base model's layer-12 output at the pair's position: the first line
break, or the rhyme slot for the embedded default's site, docs/embedded.md)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from steercmp.config import experiments_dir
from steercmp.lm.capture import capture_residuals
from steercmp.lm.prompts import resolve_rule, tokenize_text
from steercmp.rhymes import FIRST_LINE_TEMPLATES, make_couplets, rhyme_group, single_token_filter

MINI_NAME = "gemma-3-270m-L12-mini-v1"
LAYER = 12
#: the position rules a mini pair can be built for; the first keeps the original cache name
POSITIONS = ("first_line_break", "last")
SEED = 1234
INJECTION_CANDIDATES = ("\u321c", "\u3231", "\u3239", "\u2603")
AV_TEMPLATE = ("Explain the activation <concept>{injection_char}</concept> as a rhyme plan. "
               "Answer inside <explanation></explanation> tags.")
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
                 "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
                 "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
                 "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
FIRST_LINES = FIRST_LINE_TEMPLATES  # the battery generator's first lines (steercmp.rhymes)
SECOND_LINES = (
    "And then I turned and gazed upon the",
    "And all the while I thought about the",
    "And every night I dreamed about the",
    "But in the end we only found the",
    "So now I sit and think about the",
    "Until at last I reached the distant",
)
N_COUPLETS = 400       # from steercmp.rhymes.make_couplets
N_LEXICON = 700        # extra couplets over the wider lexicon
N_EVAL_EXTRA = 0       # extra template couplets in the evaluation (0: battery prompts only)
N_EVAL_MAX = 32        # held-out evaluation prompts: the shipped batteries' couplets
N_BATTERY_WORD_COUPLETS = 4  # training couplets per battery line-end word (other contexts)
TRAIN_FROM_BLOCK = 13  # AV blocks 13..17 are fine-tuned
AV_EPOCHS = 2
AV_BATCH = 16
AV_LR = 3e-4
N_NEGATIVES = 6000     # extra output-vocabulary tokens kept in the restricted softmax


def mini_name(position: str = POSITIONS[0]) -> str:
    """The cache name of the pair read at ``position`` (one of :data:`POSITIONS`)."""
    if position not in POSITIONS:
        raise ValueError(f"the mini pair is built for {', '.join(POSITIONS)}, not {position!r}")
    return MINI_NAME if position == POSITIONS[0] else MINI_NAME.replace("-mini-", f"-{position}-mini-")


def shipped_battery_files() -> list[Path]:
    """The batteries the shipped experiment configs run, the embedded default's first: their
    prompts are held out of training and the first :data:`N_EVAL_MAX` are the evaluation."""
    exp_dir = experiments_dir()
    configs = sorted(exp_dir.glob("*.yaml"), key=lambda q: (q.name != "embedded.yaml", q.name))
    files: list[Path] = []
    for cfg in configs:
        try:
            name = str((yaml.safe_load(cfg.read_text()) or {}).get("battery") or "")
        except yaml.YAMLError:
            continue
        if not name:
            continue
        path = exp_dir / "batteries" / f"{name}.yaml" if "/" not in name and not name.endswith(".yaml") \
            else (exp_dir / name).resolve()
        if path.is_file() and path not in files:
            files.append(path)
    return files


def rhyme_ending(word: str) -> str:
    """The spelled rhyme ending: last vowel group plus what follows (stream -> eam)."""
    m = re.search(r"[aeiouy]+[^aeiouy]*e?$", word.lower())
    return m.group(0) if m else word.lower()


def explanation_for(line_end: str, plans: Sequence[str]) -> str:
    plan_txt = " or ".join(plans[:2])
    return (f"The line ends with {line_end}, so the next line should rhyme with "
            f"-{rhyme_ending(line_end)}, planning {plan_txt}.")


def battery_words(root: Path | None = None) -> tuple[set[str], list[dict[str, Any]]]:
    """All words of the batteries the shipped configs run and their prompts (held out of
    training); ``root`` reads every battery in that folder instead."""
    paths = sorted(root.glob("*.yaml")) if root is not None and root.is_dir() else (
        [] if root is not None else shipped_battery_files())
    words: set[str] = set()
    prompts: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        for p in data.get("prompts") or []:
            fams = p.get("families") or {}
            for fam in fams.values():
                words.update(str(w).lower() for w in fam)
            first = str(p.get("text", "")).split("\n", 1)[0]
            toks = [w.strip(".,;:!?\"'()").lower() for w in first.split()]
            if toks:
                words.add(toks[-1])
            prompts.append(p)
    if not prompts:  # the note's prompt ids
        words |= {"bird", "word", "fire", "desire", "hill", "still", "night", "light", "rain",
                  "pane", "shore", "more", "snow", "glow", "stream", "dream"}
    return words, prompts


def _lexicon(tokenizer, banned: set[str]) -> list[tuple[str, list[str]]]:  # noqa: ANN001
    from steercmp import rhymes

    single = rhymes.single_token_filter(tokenizer)
    rhymes.rhyme_part("a")
    index = rhymes._index()[1]  # rhyme part -> words (sorted); read-only use
    out = []
    for part in sorted(index):
        words = [w for w in index[part] if w.isalpha() and w.isascii() and len(w) >= 3
                 and w not in banned and rhymes.is_common(w)]
        words = [w for w in words if single(w)]
        if len(words) >= 3:
            for w in words:
                out.append((w, [x for x in words if x != w]))
    return out


def battery_word_couplets(seed: int = SEED) -> list[dict[str, Any]]:
    """Template couplets over each battery prompt's line-end word, planning its original family.

    The battery PROMPTS stay held out (their texts never appear in training); their words do
    appear, in other contexts, so the AV can learn to name them and the text edit has terms to
    edit. Without this every battery prompt falls back (the AV cannot name a word it never saw).
    """
    _, prompts = battery_words()
    rng = random.Random(f"nla-mini-battery:{seed}")
    texts = {str(p.get("text")) for p in prompts}
    items = []
    for p in prompts:
        first = str(p["text"]).split("\n", 1)[0]
        end = first.split()[-1].strip(".,;:!?\"'()").lower()
        plans = [str(w).lower() for w in (p.get("families") or {}).get("original", [])][:2] or [end]
        for first_t in rng.sample(FIRST_LINES, N_BATTERY_WORD_COUPLETS):
            text = first_t.format(w=end) + "\n" + rng.choice(SECOND_LINES)
            if text not in texts:
                items.append({"text": text, "line_end": end, "plans": plans})
    return items


def make_training_couplets(tokenizer, banned: set[str], seed: int = SEED  # noqa: ANN001
                           ) -> list[dict[str, Any]]:
    rng = random.Random(f"nla-mini:{seed}")
    single = single_token_filter(tokenizer)
    items = []
    for c in make_couplets(N_COUPLETS, seed, exclude=sorted(banned)):
        group = [w for w in rhyme_group(c.line_end, vocab_filter=single) if w not in banned]
        others = [w for w in group if w != c.plan]
        plans = [c.plan] + ([rng.choice(others)] if others else [])
        items.append({"text": c.text, "line_end": c.line_end, "plans": plans})
    lex = _lexicon(tokenizer, banned)
    rng.shuffle(lex)
    for word, group in lex[:N_LEXICON]:
        plans = rng.sample(group, 2)
        text = rng.choice(FIRST_LINES).format(w=word) + "\n" + rng.choice(SECOND_LINES)
        items.append({"text": text, "line_end": word, "plans": plans})
    items.extend(battery_word_couplets(seed))
    held_out = {str(p.get("text")) for p in battery_words()[1]}
    items = [it for it in items if it["text"] not in held_out]  # battery prompts stay unseen
    for it in items:
        it["explanation"] = explanation_for(it["line_end"], it["plans"])
    return items


def make_eval_items(tokenizer, seed: int = SEED) -> list[dict[str, Any]]:  # noqa: ANN001
    """Held-out prompts: the battery prompts plus template couplets over battery line-end words."""
    words, prompts = battery_words()
    rng = random.Random(f"nla-mini-eval:{seed}")
    single = single_token_filter(tokenizer)
    items = []
    ends = []
    for p in prompts:
        first = str(p["text"]).split("\n", 1)[0]
        end = first.split()[-1].strip(".,;:!?\"'()").lower()
        original = [str(w).lower() for w in (p.get("families") or {}).get("original", [])]
        items.append({"text": p["text"], "line_end": end, "plans": original, "id": p.get("id")})
        ends.append(end)
    if not ends:
        ends = ["bird", "fire", "hill", "night", "rain", "shore", "snow", "stream"]
    for i in range(N_EVAL_EXTRA):
        end = ends[i % len(ends)]
        group = rhyme_group(end, vocab_filter=single)
        text = rng.choice(FIRST_LINES).format(w=end) + "\n" + rng.choice(SECOND_LINES)
        items.append({"text": text, "line_end": end, "plans": group[:8]})
    if len(items) > N_EVAL_MAX:  # keep every kind: battery prompts first, template couplets last
        keep = N_EVAL_MAX - min(N_EVAL_EXTRA, N_EVAL_MAX // 3)
        items = items[:keep] + items[len(items) - (N_EVAL_MAX - keep):]
    return items




def extract_gold(lm, items: Sequence[dict[str, Any]], bar=None, batch: int = 16,  # noqa: ANN001
                 position: str = POSITIONS[0]) -> torch.Tensor:
    """Layer-12 output at ``position`` (a position rule) of each item's text, fp32 ``[n, d]``."""
    tok = lm.tokenizer
    out = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        seqs = [tokenize_text(tok, it["text"])[0] for it in chunk]
        pos = [resolve_rule(tok, ids, it["text"], position) for ids, it in zip(seqs, chunk, strict=True)]
        resids = capture_residuals(lm, LAYER, seqs, batch_size=batch)
        out.append(torch.stack([r[p] for r, p in zip(resids, pos, strict=True)]))
        if bar is not None:
            bar.update(len(chunk))
    return torch.cat(out)
