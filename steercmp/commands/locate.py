"""``steercmp locate EXPERIMENT.yaml``: a causal site scan for the rhyme plan, on the shared engine.

For every battery prompt and target family (``edited``, ``unrelated``) a counterfactual couplet
changes the plan (:mod:`steercmp.lm.couplet_counterfactual`); for every layer and every position from the
end of line 1 to the rhyme slot, its residual is patched into the original run and the shift of
the target-minus-original log-mass at the slot is measured (:mod:`steercmp.score.patching`).
It runs on ``run``'s machinery (:mod:`steercmp.run.stage_locate`): the run's resource manager
loads the base model, every layer is one resumable unit under ``<out>/units/locate/`` keyed like
a run's units, a rerun reuses them, one process writes the directory, and ``manifest.json``
records it. A prompt without a same-length counterfactual is dropped (``locate.json`` says why).
Writes ``locate.parquet`` (one row per prompt and site), ``locate_summary.parquet`` (mean and CI
over prompts per site), ``heatmap.png``, ``locate.html`` and prints the best sites.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from steercmp.config import Experiment
from steercmp.couplets import CONSTRUCTIONS
from steercmp.errors import ConfigError
from steercmp.lm.device import resolve_dtype_name
from steercmp.plugin_manager import PluginSet
from steercmp.report.locate_heatmap import write_locate
from steercmp.run.runner import Runner
from steercmp.run.stage_locate import LocateScan


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


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _int_list(text: str) -> list[int]:
    """``0-17`` or ``4,8,12``; the model's range is checked once it is loaded."""
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as layers", where="--layers",
                          fix="write e.g. 0-17 or 4,8,12") from None
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


def locate_command(args: argparse.Namespace, experiment: Experiment, plugins: PluginSet) -> int:
    out = Path(args.out) if args.out else Path("artifacts") / f"{experiment.name}-locate"
    scan = LocateScan(families=_names(args.families), constructions=_names(args.constructions),
                      layers=tuple(_int_list(args.layers)) if args.layers else None, offsets=_offsets(args.offsets))
    runner = Runner(experiment.with_methods(()), plugins, out, fresh=args.fresh, progress=not args.no_progress)
    plan, records = runner.locate(scan)
    meta = {"experiment": experiment.name, "source": experiment.source, "model": experiment.model.id,
            "dtype": resolve_dtype_name(experiment.model.dtype, experiment.model.device),
            "n_prompts": len(experiment.battery), **plan.meta()}
    best = write_locate(out, records, meta, top=args.top, seed=experiment.seed)
    _print_best(best)
    if plan.dropped:
        print(f"\n{len(plan.dropped)} counterfactuals dropped (no same-length counterfactual; listed in locate.json)")
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
