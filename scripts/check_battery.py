#!/usr/bin/env python
"""Check a prompt battery: design faults first (no model), then its quality on the embedded 270M.

Design faults (:func:`steercmp.battery.hygiene_problems`) reject the battery with exit code 1:
an edit key that already occurs in the prompt text, or families of unequal size.

Quality, for each prompt: next-token log-prob mass (logsumexp over the single-token ``▁word`` forms) of the
original / edited / unrelated families at the last position, the rank of the plan word (the first
``original`` word) and the model's top next tokens. Summary: the fraction of prompts whose
original mass beats the edited (and the unrelated) mass. A plain forward with log_softmax.

    .venv/bin/python scripts/check_battery.py experiments/batteries/note8.yaml
    .venv/bin/python scripts/check_battery.py experiments/batteries/note8.yaml --hygiene-only
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import yaml


def single_ids(tok, words):
    ids = []
    for w in words:
        enc = tok.encode(" " + w, add_special_tokens=False)
        if len(enc) == 1:
            ids.append(enc[0])
    return ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("battery")
    ap.add_argument("--top", type=int, default=5, help="top next tokens to show")
    ap.add_argument("--hygiene-only", action="store_true", help="check the design faults only (no model)")
    ap.add_argument("--usable", action="store_true",
                    help="apply the pre-declared usability rule (steercmp.score.usable) and keep the usable prompts")
    ap.add_argument("--layer", type=int, default=12, help="layer whose output the scorer resumes from (any works)")
    ap.add_argument("--select", type=int, default=None, help="keep the first N usable prompts (battery order)")
    ap.add_argument("--name", default=None, help="name of the written battery")
    ap.add_argument("--out", default=None, help="with --usable: write the usable battery here")
    ap.add_argument("--rejects", default=None, help="with --usable: write the rejected prompts and why here")
    ap.add_argument("--min-usable", type=int, default=1,
                    help="with --usable: fewer usable prompts is an error (exit 2, nothing written)")
    ap.add_argument("--model", default="embedded:gemma-3-270m", help="model to judge with (HF id or local dir)")
    args = ap.parse_args(argv)

    from steercmp.battery import Battery, hygiene_problems
    from steercmp.errors import SteercmpError
    from steercmp.lm.load import load_base_model

    try:
        problems = hygiene_problems(Battery.from_yaml(args.battery))
    except SteercmpError as exc:
        print(f"check_battery: error: {exc.one_line()}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"check_battery: {args.battery}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.battery}: no design faults")
    if args.hygiene_only:
        return 0
    if args.usable:
        try:
            return select_usable(args)
        except SteercmpError as exc:
            print(f"check_battery: error: {exc.one_line()}", file=sys.stderr)
            return 2

    with open(args.battery) as fh:
        battery = yaml.safe_load(fh)
    lm = load_base_model(progress=False)
    tok, model = lm.tokenizer, lm.model
    torch.set_grad_enabled(False)

    rows = []
    print(f"{'id':24} {'orig':>7} {'edit':>7} {'unrel':>7} {'rank':>6}  top")
    for p in battery["prompts"]:
        ids = tok(p["text"], return_tensors="pt").input_ids
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        mass = {}
        for fam in ("original", "edited", "unrelated"):
            fam_ids = single_ids(tok, p["families"][fam])
            mass[fam] = float(torch.logsumexp(logp[fam_ids], 0)) if fam_ids else float("-inf")
        plan = p["families"]["original"][0]
        plan_ids = single_ids(tok, [plan])
        rank = int((logp > logp[plan_ids[0]]).sum()) + 1 if plan_ids else -1
        top = [tok.decode([i]).strip() for i in logp.topk(args.top).indices.tolist()]
        rows.append((p["id"], mass, rank))
        print(f"{p['id']:24} {mass['original']:7.2f} {mass['edited']:7.2f} "
              f"{mass['unrelated']:7.2f} {rank:6d}  {top}")

    n = len(rows)
    oe = sum(m["original"] > m["edited"] for _, m, _ in rows)
    ou = sum(m["original"] > m["unrelated"] for _, m, _ in rows)
    ranks = [r for _, _, r in rows if r > 0]
    print(f"\nprompts {n}: original > edited {oe}/{n} ({oe / n:.2f}); "
          f"original > unrelated {ou}/{n} ({ou / n:.2f}); "
          f"plan rank median {statistics.median(ranks) if ranks else 'n/a'}, "
          f"top-10 {sum(r <= 10 for r in ranks)}/{n}; "
          f"mean original-edited {statistics.mean(m['original'] - m['edited'] for _, m, _ in rows):+.2f}")
    return 0


def select_usable(args) -> int:
    """Apply the usability rule, write the usable battery (first --select, battery order) and the
    rejects with their reasons."""
    import polars as pl

    from steercmp.battery import Battery
    from steercmp.lm.load import load_base_model
    from steercmp.score.usable import RULE, usability

    battery = Battery.from_yaml(args.battery)
    from steercmp.errors import ConfigError

    lm = load_base_model(args.model, progress=False)
    if not 0 <= args.layer < lm.num_layers:
        raise ConfigError(f"layer {args.layer} is outside the model (0..{lm.num_layers - 1})", where="--layer",
                          fix=f"use a layer in 0..{lm.num_layers - 1}")
    table = usability(lm, battery, args.layer)
    with pl.Config(tbl_rows=-1, tbl_width_chars=160, fmt_str_lengths=80):
        print(table)
    usable = table.filter(pl.col("usable"))["prompt_id"].to_list()
    keep = usable[: args.select] if args.select else usable
    print(f"\n{len(usable)}/{table.height} prompts usable under the rule: {RULE}")
    if len(usable) < max(args.min_usable, 1):
        raise ConfigError(f"{len(usable)} of {table.height} prompts are usable under the rule, fewer than "
                          f"{max(args.min_usable, 1)}", where=args.battery,
                          fix="generate more candidates (scripts/generate_battery.py --n) or lower --min-usable")
    if args.out:
        data = yaml.safe_load(open(args.battery))
        by_id = {p["id"]: p for p in data["prompts"]}
        head = [ln for ln in open(args.battery).read().splitlines() if ln.startswith("#")]
        data["prompts"] = [by_id[pid] for pid in keep]
        data["name"] = args.name or data.get("name")
        data["description"] = (f"{len(keep)} usable couplets of {table.height} candidates ({args.battery}); "
                               f"rule: {RULE}")
        text = "\n".join([*head, f"# Selected by: python scripts/check_battery.py {args.battery} --usable "
                                  f"--select {args.select} --out {args.out} --rejects {args.rejects}"]) + "\n"
        Path(args.out).write_text(text + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120))
        print(f"wrote {args.out}: {len(keep)} prompts")
    if args.rejects:
        rejected = table.filter(~pl.col("usable")).to_dicts()
        Path(args.rejects).write_text(f"# Rejected by the usability rule: {RULE}\n"
                                      + yaml.safe_dump(rejected, sort_keys=False, allow_unicode=True, width=120))
        print(f"wrote {args.rejects}: {len(rejected)} rejects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
