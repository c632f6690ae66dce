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
Explanations are grounded in the 270M's own behaviour (v2): the words it predicts at the rhyme
slot, the line-end word with its spelled rhyme ending, and the first line's content words.

Training (CPU-sized; bf16 autocast with fp32 master weights where the dtype probe picks bf16, fp32
elsewhere): the AV is the base model with blocks 13..17 fine-tuned on cached
block-12 outputs (the gold vector injected at the injection character, as in the release) and a
restricted output vocabulary (the 262k-vocab output layer dominates CPU cost); the AR's top blocks
and value head are trained by gradient on the normalised MSE, the head starting from a ridge fit.
``quality.json`` records the three quality targets (held-out fve_nrm from the AV's explanations,
naming rate, build time) and the AR's learning curves. Every random choice is seeded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from steercmp.api import cache_root

from .data import POSITIONS, mini_name

#: measured build times (docs/scaling.md): 420-628 s on 2-core Xeon / EPYC CPUs with native bf16,
#: 2571 s on a 2-core AVX2-only EPYC (Zen 1), where the probe picks float32
BUILD_ESTIMATE = "7 to 11 minutes on 2 CPU cores with native bf16, about 45 without"


def mini_dir(position: str = POSITIONS[0]) -> Path:
    return cache_root() / "nla" / mini_name(position)


def is_built(root: Path | None = None, position: str = POSITIONS[0]) -> bool:
    """Whether a complete pair of this version is cached: both checkpoints, and a quality file
    that parses, names this version and carries the measured targets (a missing or stale quality
    file means a rebuild, never a silent pass)."""
    root = root or mini_dir(position)
    if not all((root / p).exists() for p in ("av/nla_meta.yaml", "ar/nla_meta.yaml",
                                             "ar/value_head.safetensors", "quality.json")):
        return False
    try:
        quality = json.loads((root / "quality.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(quality, dict) and quality.get("mini_version") == mini_name(position)
            and isinstance(quality.get("targets"), dict))


def ensure_mini_pair(progress: bool = True, *, force: bool = False, position: str = POSITIONS[0]
                     ) -> tuple[Path, Path]:
    """Return ``(av_dir, ar_dir)`` of the miniature pair read at ``position``, building it (once)
    if needed, in a fresh process (its training heap is returned to the OS when it ends)."""
    root = mini_dir(position)
    if force or not is_built(root, position):
        from steercmp.api import build_lock, in_fresh_process

        from .build import build_mini_pair

        with build_lock(root, "the mini NLA pair"):
            if force or not is_built(root, position):  # another process may have built it meanwhile
                in_fresh_process("the mini NLA pair", build_mini_pair, root, progress=progress, position=position)
    else:
        _say_if_trained_in_another_dtype(root)
    return root / "av", root / "ar"


def _say_if_trained_in_another_dtype(root: Path) -> None:
    """One line when the cached pair was trained in another dtype than this machine's probe picks
    now (a forced ``STEERCMP_DTYPE``, another CPU on a shared cache): it is reused, never silently."""
    from steercmp.api import resolve_dtype_name

    trained = json.loads((root / "quality.json").read_text()).get("train_dtype")
    now = resolve_dtype_name("auto", "cpu")
    if trained and trained != now:
        print(f"steercmp: reusing the cached mini NLA pair {root.name}, trained in {trained} (this machine picks "
              f"{now} now; its fidelity is in {root / 'quality.json'}); `steercmp nla build-mini --force` "
              f"rebuilds it in {now}", file=sys.stderr)


