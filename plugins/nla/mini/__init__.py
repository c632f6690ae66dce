"""A miniature NLA pair for the embedded Gemma 3 270M (layer 12), built by steercmp on first use.

No NLA exists for the 270M model, so steercmp trains a small one on its own deterministic data and
writes it in EXACTLY the released layout (config.json, safetensors, tokenizer with a chat
template, ``nla_meta.yaml``; the AR adds ``value_head.safetensors`` and is truncated to blocks
0..12). It is then loaded by the same loader as the released checkpoints.

Data: couplets (:func:`steercmp.rhymes.make_couplets` plus the same first-line templates over a
wider CMU lexicon, so the AV learns to read words it has not seen), with every battery PROMPT held
out (battery words appear in other training couplets, so the AV can name them). Gold vectors
are the base model's layer-12 output at the first line break (the planning position). Explanations are templated: they name the line-end word, its spelled rhyme ending and
two plan words.

Training (CPU-sized): the AV is the base model with blocks 13..17 fine-tuned on cached block-12
outputs and a restricted output vocabulary (the 262k-vocab output layer dominates CPU cost); the
AR's value head is fit in closed form (ridge regression) on the frozen truncated backbone's
last-token features. Every random choice is seeded.
"""

from __future__ import annotations

from pathlib import Path

from steercmp.lm.embedded import cache_root

from .data import MINI_NAME


def mini_dir() -> Path:
    return cache_root() / "nla" / MINI_NAME


def is_built(root: Path | None = None) -> bool:
    root = root or mini_dir()
    return all((root / p).exists() for p in ("av/nla_meta.yaml", "ar/nla_meta.yaml",
                                             "ar/value_head.safetensors", "quality.json"))


def ensure_mini_pair(progress: bool = True, *, force: bool = False) -> tuple[Path, Path]:
    """Return ``(av_dir, ar_dir)`` of the miniature pair, building it (once) if needed."""
    root = mini_dir()
    if force or not is_built(root):
        from .build import build_mini_pair

        build_mini_pair(root, progress=progress)
    return root / "av", root / "ar"


