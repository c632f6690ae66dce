#!/usr/bin/env python
"""Generate the expanded couplet battery from the CMU rhyme dictionary (steercmp.rhymes).

Couplets come from :func:`steercmp.rhymes.make_couplets` (template lines, rhyme pairs grouped by
CMU rhyme sound); families come from the same rhyme groups: ``original`` = the plan word plus one
more word of the line's rhyme sound, ``edited`` = two other words of that sound, ``unrelated`` =
two words of a different sound. Every family word is kept only if its leading-space form
(``▁word``) is a single token of the embedded Gemma 3 270M tokenizer. Deterministic in --seed.

    .venv/bin/python scripts/generate_battery.py --out experiments/batteries/expanded.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from steercmp import rhymes

NOTE8_IDS = {"bird_word", "fire_desire", "hill_still", "night_light", "rain_pane", "shore_more",
             "snow_glow", "stream_dream"}


def load_tokenizer():
    from transformers import AutoTokenizer

    from steercmp.lm.embedded import ensure_embedded_model

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def build(n: int, seed: int, keep) -> list[dict]:
    groups = {part: [w for w in words if keep(w)] for part, words in rhymes.couplet_rhyme_groups()}
    groups = {part: words for part, words in groups.items() if len(words) >= 2}
    parts = sorted(groups)
    multi = [w for w in rhymes.COUPLET_NOUNS if not keep(w)]
    prompts: list[dict] = []
    seen: set[str] = set()
    # over-generate, then drop note8 ids and duplicates, keeping make_couplets' balanced order
    for c in rhymes.make_couplets(3 * n, seed, exclude=multi):
        pid = f"{c.line_end}_{c.plan}"
        if pid in NOTE8_IDS or pid in seen or c.rhyme not in groups:
            continue
        seen.add(pid)
        # same-sound pool: lexicon nouns first, then common single-token rhymes from the CMU dict
        extra = rhymes.rhyme_group(c.plan, vocab_filter=keep)
        pool = [w for w in dict.fromkeys([*groups[c.rhyme], *extra]) if w not in (c.line_end, c.plan)]
        if len(pool) < 3:
            continue
        original = [c.plan, pool[0]]
        edited = pool[1:3]
        k = parts.index(c.rhyme)
        other = parts[(k + len(parts) // 2) % len(parts)]  # a fixed, different sound
        unrelated = groups[other][:2]
        prompts.append({
            "id": pid,
            "text": c.text,
            "rhyme": c.rhyme,
            "families": {"original": original, "edited": edited, "unrelated": unrelated},
            "edits": {
                "edited": dict(zip(original, edited, strict=True)),
                "unrelated": dict(zip(original, unrelated, strict=True)),
            },
        })
        if len(prompts) == n:
            break
    return prompts


def render(prompts: list[dict], n: int, seed: int) -> str:
    q = json.dumps  # JSON strings and lists are valid YAML and never read as booleans
    sounds = sorted({p["rhyme"] for p in prompts})
    lines = [
        "# GENERATED FILE - do not edit by hand.",
        f"# Written by: python scripts/generate_battery.py --n {n} --seed {seed} "
        "--out experiments/batteries/expanded.yaml",
        "# Couplets and rhyme families from steercmp.rhymes (CMU pronouncing dictionary); every",
        "# family word is a single '▁word' token of the embedded Gemma 3 270M tokenizer.",
        "version: 1",
        "name: expanded",
        f"description: {q(f'{len(prompts)} template couplets over {len(sounds)} rhyme sounds, generated from the CMU rhyme dictionary (seed {seed}).')}",
        "defaults: {inject: first_line_break, score: last}",
        "prompts:",
    ]
    for p in prompts:
        lines += [
            f"  - id: {p['id']}",
            f"    text: {q(p['text'])}",
            f"    rhyme: {q(p['rhyme'])}",
            "    families:",
            *(f"      {fam}: {q(words)}" for fam, words in p["families"].items()),
            "    edits:",
            *(f"      {fam}: {q(m)}" for fam, m in p["edits"].items()),
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=56, help="number of couplets (default 56)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("experiments/batteries/expanded.yaml"))
    args = ap.parse_args(argv)
    keep = rhymes.single_token_filter(load_tokenizer())
    prompts = build(args.n, args.seed, keep)
    if len(prompts) < args.n:
        print(f"only {len(prompts)} couplets could be built", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(prompts, args.n, args.seed))
    counts = Counter(p["rhyme"] for p in prompts)
    print(f"wrote {args.out}: {len(prompts)} couplets over {len(counts)} rhyme sounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
