"""A miniature NLA pair for the embedded Gemma 3 270M (layer 12), built by steercmp on first use.

No NLA exists for the 270M model, so steercmp trains a small one on its own deterministic data and
writes it in EXACTLY the released layout (config.json, safetensors, tokenizer with a chat
template, ``nla_meta.yaml``; the AR adds ``value_head.safetensors`` and is truncated to blocks
0..12). It is then loaded by the same loader as the released checkpoints.

Data: couplets (:func:`steercmp.rhymes.make_couplets` plus the same first-line templates over a
wider CMU lexicon, so the AV learns to read words it has not seen), with every battery PROMPT held
out (battery words appear in other training couplets, so the AV can name them). Gold vectors
are the base model's layer-12 output at the pair's position: the first line break (the note's
planning position) or the rhyme slot ``last`` (the embedded default's site, docs/embedded.md).
Explanations are templated: they name the line-end word, its spelled rhyme ending and two plan
words.

Training (CPU-sized): the AV is the base model with blocks 13..17 fine-tuned on cached block-12
outputs and a restricted output vocabulary (the 262k-vocab output layer dominates CPU cost); the
AR's value head is fit in closed form (ridge regression) on the frozen truncated backbone's
last-token features. Every random choice is seeded.
"""

from __future__ import annotations

from pathlib import Path

from steercmp.lm.embedded import cache_root

from .data import POSITIONS, mini_name


def mini_dir(position: str = POSITIONS[0]) -> Path:
    return cache_root() / "nla" / mini_name(position)


def is_built(root: Path | None = None, position: str = POSITIONS[0]) -> bool:
    root = root or mini_dir(position)
    return all((root / p).exists() for p in ("av/nla_meta.yaml", "ar/nla_meta.yaml",
                                             "ar/value_head.safetensors", "quality.json"))


def ensure_mini_pair(progress: bool = True, *, force: bool = False, position: str = POSITIONS[0]
                     ) -> tuple[Path, Path]:
    """Return ``(av_dir, ar_dir)`` of the miniature pair read at ``position``, building it (once)
    if needed."""
    root = mini_dir(position)
    if force or not is_built(root):
        from .build import build_mini_pair

        build_mini_pair(root, progress=progress, position=position)
    return root / "av", root / "ar"


