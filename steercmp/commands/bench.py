"""``steercmp bench``: the command (options, presets, the JSON and the table); the benchmark is
:mod:`steercmp.bench`."""

from __future__ import annotations

import argparse
import json
import sys

from steercmp.battery import Battery
from steercmp.battery_files import experiments_dir
from steercmp.bench.completions import FULL_COMPLETIONS, QUICK_COMPLETIONS, SMOKE_COMPLETIONS
from steercmp.bench.suite import QUICK, TOLERANCE, PathSizes, environment, format_table, run_bench
from steercmp.lm.load import LoadedModel, load_base_model
from steercmp.paths import writable_file

DEFAULT_BATTERY = experiments_dir() / "batteries" / "expanded.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``steercmp bench`` (cli.py defines --out, --battery and --quick)."""
    parser.add_argument("--out", default="artifacts/bench.json")
    parser.add_argument("--battery", default=None, help="battery YAML (default: expanded.yaml)")
    parser.add_argument("--quick", action="store_true",
                        help="the full grid with the slow baselines on sampled cells (minutes on a 2-core CPU)")
    parser.add_argument("--smoke", action="store_true", help="two prompts, a handful of cells (a smoke test)")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--loop-cells", type=int, default=70, help="cells timed for (a)")
    parser.add_argument("--nnsight-cells", type=int, default=70, help="cells timed for (b)")
    parser.add_argument("--batched-cells", type=int, default=None, help="cells timed for (c) (default all)")
    parser.add_argument("--no-completions", action="store_true")


def main(args: argparse.Namespace, lm: LoadedModel | None = None) -> int:
    """Entry point of ``steercmp bench``; ``lm`` lets tests pass a tiny model."""
    out = writable_file(getattr(args, "out", None) or "artifacts/bench.json", where="--out")
    quick, smoke = bool(getattr(args, "quick", False)), bool(getattr(args, "smoke", False))
    battery = Battery.from_yaml(getattr(args, "battery", None) or DEFAULT_BATTERY)
    n_prompts = getattr(args, "prompts", None) or (2 if smoke else None)
    prompts = list(battery.prompts[:n_prompts] if n_prompts else battery.prompts)
    if lm is None:
        lm = load_base_model(progress=False)
    layer = getattr(args, "layer", None)
    layer = 12 if layer is None else layer
    layer = min(layer, lm.num_layers - 1)
    def sample(name: str, full: int | None) -> int | None:
        if smoke:
            return 8 if name != "batched_cells" else None
        return QUICK[name] if quick else getattr(args, name, full)

    completions = None if getattr(args, "no_completions", False) else (
        SMOKE_COMPLETIONS if smoke else QUICK_COMPLETIONS if quick else FULL_COMPLETIONS)
    sizes = PathSizes(loop_cells=sample("loop_cells", 70), nnsight_cells=sample("nnsight_cells", 70),
                      batched_cells=sample("batched_cells", None))
    result = run_bench(lm, layer, prompts, sizes=sizes, completions=completions,
                       log=lambda m: print(m, file=sys.stderr))
    result["environment"] = environment(lm)
    result["model"] = lm.source
    result["mode"] = "smoke" if smoke else "quick" if quick else "full"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(format_table(result))
    print(f"\nwritten to {out}")
    if not result["all_agree"]:
        bad = [k for k, a in result["agreement"].items() if not a["ok"]]
        print(f"steercmp bench: error: paths {bad} disagree with steercmp's scores beyond {TOLERANCE}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="steercmp bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
