"""The mini pair's data: training couplets, held-out battery prompts, grounded explanations,
and the gold vectors (the base model's layer-12 output at the pair's position: the first line
break, or the rhyme slot for the embedded default's site, docs/embedded.md).

Explanations are grounded in what the 270M itself does (v2): the words it predicts at the rhyme
slot (its own top next-token words), the line-end word with its spelled rhyme ending, and the
first line's content words. Nothing in them comes from a dictionary the activation cannot know.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from steercmp.api import (
    FIRST_LINE_TEMPLATES,
    experiments_dir,
    make_couplets,
    resolve_rule,
    rhyme_group,
    single_token_filter,
    tokenize_text,
)

from ..editing import spelled_ending

MINI_NAME = "gemma-3-270m-L12-mini-v8"  # v8: the AR's feature passes in the training dtype (v7: 4 epochs)
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
N_PREDICTED = 3        # the model's own top next-token words named in an explanation
N_CONTENT = 2          # content words of the first line named in an explanation
AR_TRAIN_BLOCKS = 3    # the AR's top blocks fine-tuned by gradient (with the value head)
#: v2's held-out curve: 0.897 at epoch 8, 0.917 at 12 (v3 cut the last 4: issue 20); v4 keeps the
#: fewest epochs whose v3 held-out point was within 0.03 of v3's last (docs/embedded.md: 0.892 at 6
#: against 0.915 at 8), a rule written down before the v4 build; v7 applies the same rule to v6's
#: curve (AMD EPYC: 0.870 at 4 against 0.895 at 6; 0.809 at 3), decided before the v7 build
AR_EPOCHS = 4
AR_BATCH = 32
AR_LR = 2e-4
STOPWORDS = frozenset("""a an the and or but so if then than that this these those with from into onto upon
over under about above below beside between through while where when what which who whom whose
all any each every some such no not nor only own same too very just once again still ever never
i me my we our you your he him his she her it its they them their there here at by for of on in to
as is was were be been being am are do did does have has had will would shall should can could may
might must let lets like""".split())


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
    """The spelled rhyme ending: last vowel group plus what follows (stream -> eam); the same
    rule the method's cue edit uses."""
    return spelled_ending(word)


def content_words(text: str, n: int = N_CONTENT) -> list[str]:
    """The first line's content words before its last word (no stopwords), in order, first ``n``."""
    first = text.split("\n", 1)[0]
    words = [w.strip(".,;:!?\"'()").lower() for w in first.split()][:-1]
    return [w for w in words if w.isalpha() and len(w) >= 3 and w not in STOPWORDS][:n]


def explanation_for(line_end: str, predicted: Sequence[str], content: Sequence[str] = ()) -> str:
    """A grounded explanation: what the model predicts at the rhyme slot, the line-end word and
    its rhyme ending, and the line's content words."""
    said = ", ".join(predicted[:-1]) + (" or " if len(predicted) > 1 else "") + predicted[-1] if predicted else "?"
    about = f" The line is about {' and '.join(content)}." if content else ""
    return (f"The line ends with {line_end}, rhyme -{rhyme_ending(line_end)}. "
            f"The next word is likely {said}.{about}")


def word_token_ids(tokenizer) -> dict[int, str]:  # noqa: ANN001
    """Vocabulary tokens that are a whole lower-case word after a space (``▁dream``): the words
    an explanation may say the model predicts."""
    out = {}
    for tid, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if isinstance(tok, str) and tok.startswith("\u2581"):
            w = tok[1:]
            if len(w) >= 2 and w.isascii() and w.isalpha() and w.islower():
                out[tid] = w
    return out


@torch.no_grad()
def read_items(lm, items: list[dict[str, Any]], position: str = POSITIONS[0], bar=None,  # noqa: ANN001
               k: int = N_PREDICTED, batch: int = 64, layer: int = LAYER) -> torch.Tensor:
    """Everything the pair is built from, in one plain forward of ``lm`` (in its own dtype) per
    batch of equal-length texts (no padding): returns the gold vectors, the block-``layer`` output
    at ``position`` (a position rule), as float32 ``[n, d]``; and gives every item, in place, the
    base model's own top-``k`` next words at the end of its text (the rhyme slot, ``predicted``)
    and its grounded ``explanation``."""
    tok = lm.tokenizer
    words = word_token_ids(tok)
    ids_of = torch.tensor(sorted(words))
    seqs = [tokenize_text(tok, it["text"])[0] for it in items]
    gold = torch.empty(len(items), lm.d_model)
    by_len: dict[int, list[int]] = {}
    for i, sq in enumerate(seqs):
        by_len.setdefault(len(sq), []).append(i)
    for idx_all in by_len.values():
        for s in range(0, len(idx_all), batch):
            idx = idx_all[s:s + batch]
            ids = torch.tensor([list(seqs[i]) for i in idx], device=lm.input_device)
            out = lm.model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
            resid = out.hidden_states[layer + 1].float().cpu()  # [0] is the embeddings
            top = out.logits[:, -1].float().cpu()[:, ids_of].topk(k, dim=-1).indices
            for row, i in enumerate(idx):
                it = items[i]
                gold[i] = resid[row, resolve_rule(tok, seqs[i], it["text"], position)]
                it["predicted"] = [words[int(ids_of[j])] for j in top[row]]
                it["explanation"] = explanation_for(it["line_end"], it["predicted"], content_words(it["text"]))
            if bar is not None:
                bar.update(len(idx))
    return gold


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
    from steercmp.api import rhymes

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
    return [it for it in items if it["text"] not in held_out]  # battery prompts stay unseen


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
