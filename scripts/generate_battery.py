#!/usr/bin/env python
"""Generate couplet batteries from the CMU rhyme dictionary (steercmp.rhymes).

Couplets come from :func:`steercmp.rhymes.make_couplets` (template lines, rhyme pairs grouped by
CMU rhyme sound). Two kinds of families:

- ``--kind same`` (the expanded battery): ``original`` = the plan word plus one more word of the
  line's rhyme sound, ``edited`` = two other words of that sound, ``unrelated`` = two words of a
  different sound (the research note's same-rhyme edit, dream -> gleam).
- ``--kind rhyme`` (a rhyme-sound change): ``original`` as above, ``edited`` = two words of a
  second sound, ``unrelated`` = two words of a third sound; each target family also gets a cue
  word in ``meta.cue`` (a third word of its sound, in no family), the line-end word of its
  counterfactual couplet (steercmp.lm.couplet_counterfactual).

Every family and cue word is kept only if its leading-space form (``▁word``) is a single token of
the embedded Gemma 3 270M tokenizer. Deterministic in --seed; --exclude-from holds out the
couplets (line-end and plan word pairs) of another battery, so a development split and the battery
it selects a site for never share a couplet.

    .venv/bin/python scripts/generate_battery.py --out experiments/batteries/expanded.yaml
    .venv/bin/python scripts/generate_battery.py --kind rhyme --n 96 --seed 1 --name rhyme96 \
        --out experiments/batteries/rhyme96.yaml
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


def build(n: int, seed: int, keep, kind: str = "same", exclude: frozenset[str] = frozenset()) -> list[dict]:
    groups = {part: [w for w in words if keep(w)] for part, words in rhymes.couplet_rhyme_groups()}
    groups = {part: words for part, words in groups.items() if len(words) >= 2}
    parts = sorted(groups)
    multi = [w for w in rhymes.COUPLET_NOUNS if not keep(w)]
    prompts: list[dict] = []
    seen: set[str] = set()
    # over-generate, then drop note8 ids and duplicates, keeping make_couplets' balanced order
    for c in rhymes.make_couplets(3 * n, seed, exclude=multi):
        pid = f"{c.line_end}_{c.plan}"
        if pid in NOTE8_IDS or pid in exclude or pid in seen or c.rhyme not in groups:
            continue
        seen.add(pid)
        # same-sound pool: lexicon nouns first, then common single-token rhymes from the CMU dict
        extra = rhymes.rhyme_group(c.plan, vocab_filter=keep)
        pool = [w for w in dict.fromkeys([*groups[c.rhyme], *extra]) if w not in (c.line_end, c.plan)]
        if len(pool) < 3:
            continue
        original = [c.plan, pool[0]]
        k = parts.index(c.rhyme)
        if kind == "same":
            edited = pool[1:3]
            other = parts[(k + len(parts) // 2) % len(parts)]  # a fixed, different sound
            unrelated = groups[other][:2]
            meta = None
        else:
            used = {c.line_end, *original}
            second = _family_with_cue(parts[(k + len(parts) // 3) % len(parts)], groups, keep, used)
            third = _family_with_cue(parts[(k + 2 * len(parts) // 3) % len(parts)], groups, keep, used)
            if second is None or third is None:
                continue
            (edited, cue_e), (unrelated, cue_u) = second, third
            meta = {"cue": {"edited": cue_e, "unrelated": cue_u}}
        prompt = {
            "id": pid,
            "text": c.text,
            "rhyme": c.rhyme,
            "families": {"original": original, "edited": edited, "unrelated": unrelated},
            "edits": {
                "edited": dict(zip(original, edited, strict=True)),
                "unrelated": dict(zip(original, unrelated, strict=True)),
            },
        }
        if meta:
            prompt["meta"] = meta
        prompts.append(prompt)
        if len(prompts) == n:
            break
    return prompts


def _family_with_cue(part: str, groups: dict, keep, used: set[str]) -> tuple[list[str], str] | None:
    """Two words of rhyme sound ``part`` and a third (the cue), none of them in ``used``."""
    anchor = groups[part][0]
    words = [w for w in dict.fromkeys([*groups[part], *rhymes.rhyme_group(anchor, vocab_filter=keep)])
             if w not in used and keep(w)]
    if len(words) < 3:
        return None
    return words[:2], words[2]


def render(prompts: list[dict], n: int, seed: int, name: str = "expanded", kind: str = "same",
           command: str = "") -> str:
    q = json.dumps  # JSON strings and lists are valid YAML and never read as booleans
    sounds = sorted({p["rhyme"] for p in prompts})
    what = "same-rhyme edits" if kind == "same" else "rhyme-sound changes"
    lines = [
        "# GENERATED FILE - do not edit by hand.",
        f"# Written by: python scripts/generate_battery.py {command}".rstrip(),
        "# Couplets and rhyme families from steercmp.rhymes (CMU pronouncing dictionary); every",
        "# family word is a single '▁word' token of the embedded Gemma 3 270M tokenizer.",
        "version: 1",
        f"name: {name}",
        f"description: {q(f'{len(prompts)} template couplets over {len(sounds)} rhyme sounds, {what}, generated from the CMU rhyme dictionary (seed {seed}).')}",
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
            *([f"    meta: {q(p['meta'])}"] if p.get("meta") else []),
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=56, help="number of couplets (default 56)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("experiments/batteries/expanded.yaml"))
    ap.add_argument("--kind", choices=("same", "rhyme"), default="same", help="same-rhyme edits or rhyme changes")
    ap.add_argument("--name", default="expanded")
    ap.add_argument("--exclude-from", type=Path, default=None,
                    help="a battery whose couplets (line-end, plan pairs) this one never repeats")
    args = ap.parse_args(argv)
    keep = rhymes.single_token_filter(load_tokenizer())
    exclude: frozenset[str] = frozenset()
    if args.exclude_from is not None:
        import yaml

        other = yaml.safe_load(args.exclude_from.read_text())
        exclude = frozenset(p["id"] for p in other["prompts"])
    prompts = build(args.n, args.seed, keep, args.kind, exclude)
    if len(prompts) < args.n:
        print(f"only {len(prompts)} couplets could be built", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    args.out.write_text(render(prompts, args.n, args.seed, args.name, args.kind, command))
    counts = Counter(p["rhyme"] for p in prompts)
    print(f"wrote {args.out}: {len(prompts)} couplets over {len(counts)} rhyme sounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
