"""``steercmp locate EXPERIMENT.yaml``: a causal site scan for the rhyme plan, on the shared engine.

For every battery prompt and target family (``edited``, ``unrelated``) a counterfactual couplet
changes the plan (:mod:`steercmp.lm.couplet_counterfactual`); for every layer and every position from the
end of line 1 to the rhyme slot, its residual is patched into the original run and the shift of
the target-minus-original log-mass at the slot is measured (:mod:`steercmp.score.patching`).
Staged like ``run``: the base model alone is resident, every layer is one resumable unit under
``<out>/units/locate/``, and a rerun reuses them. Writes ``locate.parquet`` (one row per prompt
and site), ``locate_summary.parquet`` (mean and CI over prompts per site), ``heatmap.png``,
``locate.html`` and prints the best sites.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from steercmp import __version__
from steercmp.config import Experiment
from steercmp.couplets import CONSTRUCTIONS, same_rhyme
from steercmp.errors import ConfigError
from steercmp.hashing import stable_hash
from steercmp.lm.couplet_counterfactual import build_counterfactual
from steercmp.lm.device import resolve_dtype_name
from steercmp.lm.load import load_base_model
from steercmp.paths import writable_dir
from steercmp.report.locate_heatmap import write_locate
from steercmp.run.keys import module_code_hash
from steercmp.run.provenance import checkpoint_identity
from steercmp.run.rundir import RunDir, write_parquet
from steercmp.run.runtime import tqdm_progress
from steercmp.run.validate import preflight
from steercmp.score.patching import prepare, scan_layer

FAMILIES = ("edited", "unrelated")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", help="experiment YAML (default experiments/embedded.yaml)")
    parser.add_argument("--out", help="output directory (default artifacts/<experiment name>-locate)")
    parser.add_argument("--layers", help="layers to scan, e.g. 0-17 or 4,8,12 (default: every layer)")
    parser.add_argument("--offsets", help="positions as offsets from the line break, e.g. -2:3 (default: the "
                                          "line-end word to the rhyme slot)")
    parser.add_argument("--families", default="edited,unrelated", help="target families (default edited,unrelated)")
    parser.add_argument("--constructions", default="auto",
                        help="counterfactual constructions: auto (swap for a same-rhyme family, cue otherwise) "
                             f"or a comma list of {', '.join(CONSTRUCTIONS)}")
    parser.add_argument("--top", type=int, default=10, help="best sites printed per family and construction")
    parser.add_argument("--fresh", action="store_true", help="ignore finished layers in the output directory")
    parser.add_argument("--no-progress", action="store_true")


def _int_list(text: str, n_layers: int | None, where: str) -> list[int]:
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as layers", where=where, fix="write e.g. 0-17 or 4,8,12") from None
    bad = [x for x in out if x < 0 or (n_layers is not None and x >= n_layers)]
    if bad:
        raise ConfigError(f"layer {bad[0]} is outside the model (0..{(n_layers or 1) - 1})", where=where,
                          fix=f"use layers 0..{(n_layers or 1) - 1}")
    return sorted(set(out))


def _offsets(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as an offset range", where="--offsets",
                          fix="write e.g. -2:3 (from the line-end word to 3 tokens after the line break)") from None
    if a > b:
        raise ConfigError(f"offset range {text!r} is empty", where="--offsets", fix="write the smaller offset first")
    return a, b


def locate_command(args: argparse.Namespace, experiment: Experiment) -> int:
    out = writable_dir(Path(args.out) if args.out else Path("artifacts") / f"{experiment.name}-locate", where="--out")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ConfigError(f"unknown target family {bad[0] if bad else args.families!r}", where="--families",
                          fix="use edited, unrelated or both")
    constructions = [c.strip() for c in args.constructions.split(",")]
    if constructions != ["auto"] and any(c not in CONSTRUCTIONS for c in constructions):
        raise ConfigError(f"unknown construction in {args.constructions!r}", where="--constructions",
                          fix=f"use auto or a comma list of {', '.join(CONSTRUCTIONS)}")
    offsets = _offsets(args.offsets)
    tokens = preflight(experiment)
    spec = experiment.model
    lm = load_base_model(spec.id, dtype=spec.dtype, device=spec.device, device_map=spec.device_map,
                         revision=spec.revision, trust_remote_code=spec.trust_remote_code, progress=not args.no_progress)
    layers = _int_list(args.layers, lm.num_layers, "--layers") if args.layers else list(range(lm.num_layers))
    pairs = []
    chat = spec.chat_template
    for prompt in experiment.battery.prompts:
        tok = tokens[prompt.id]
        if offsets is not None and offsets[1] > tok.score_pos - tok.inject_pos:
            raise ConfigError(f"offset {offsets[1]:+d} is past prompt {prompt.id!r}'s last token "
                              f"({tok.score_pos - tok.inject_pos:+d})", where="--offsets",
                              fix="end the range at or before the rhyme slot of the shortest prompt")
        for family in families:
            auto = ["swap", "block"] if same_rhyme(prompt, family) else ["cue"]
            kinds = auto if constructions == ["auto"] else constructions
            for construction in kinds:
                pairs.append((prompt, tok, build_counterfactual(lm.tokenizer, prompt, family, construction,
                                                                chat_template=chat, where=experiment.battery.source)))
    ident = checkpoint_identity(spec.id, spec.revision)
    base_key = {"model": spec.id, "files": ident.get("files", {}), "dtype": resolve_dtype_name(spec.dtype, spec.device),
                "battery": experiment.battery.content_hash(), "pairs": [(p.id, c.family, c.construction, c.word)
                                                                       for p, _t, c in pairs],
                "offsets": offsets, "code": [module_code_hash(m) for m in ("steercmp.score", "steercmp.lm")],
                "version": __version__}
    run = RunDir(out)
    progress = tqdm_progress(not args.no_progress)
    plan = None
    frames = []
    for layer in progress(layers, "locate layers", len(layers)):
        path = run.unit("locate", f"layer{layer}-{stable_hash({**base_key, 'layer': layer})}")
        if args.fresh or not path.exists():
            if plan is None:
                plan = prepare(lm, layers, pairs, batch_size=experiment.batch_size)
            write_parquet(path, pl.DataFrame(scan_layer(lm, plan, layer, batch_size=experiment.batch_size,
                                                        offsets=offsets)))
        frames.append(pl.read_parquet(path))
    lm.unload()
    records = pl.concat([f for f in frames if f.height], how="vertical")
    meta = {"experiment": experiment.name, "source": experiment.source, "model": spec.id,
            "dtype": base_key["dtype"], "layers": layers, "offsets": offsets, "n_prompts": len(experiment.battery),
            "pairs": len(pairs), "counterfactuals": [{"prompt_id": p.id, "family": c.family, "construction": c.construction,
                                                       "word": c.word} for p, _t, c in pairs]}
    best = write_locate(out, records, meta, top=args.top, seed=experiment.seed)
    _print_best(best)
    print(f"\nlocate written to {out} (locate.parquet, locate_summary.parquet, heatmap.png, locate.html)")
    return 0


def _print_best(best: pl.DataFrame) -> None:
    for (family, construction), grp in best.group_by("family", "construction", maintain_order=True):
        print(f"\nbest sites toward {family} ({construction}): layer, position, mean shift [95% CI], "
              "prompts positive / n, mean ceiling")
        for r in grp.iter_rows(named=True):
            print(f"  layer {r['layer']:>3}  {r['label']:<10} {r['mean_shift']:+8.3f} "
                  f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]  {r['n_positive']:>3}/{r['n']:<3}  "
                  f"ceiling {r['mean_ceiling']:+.3f}")
    sys.stdout.flush()


__all__ = ["configure", "locate_command"]
