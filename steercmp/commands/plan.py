"""``steercmp plan``: validate an experiment and show its stages, models and peak memory.

Nothing is downloaded: model sizes come from a table of known models, a local config.json,
or a method's own estimate (:attr:`steercmp.api.Resource.params`).
"""

from __future__ import annotations

from steercmp.catalog import DTYPE_BYTES, known_model
from steercmp.config import Experiment
from steercmp.errors import ConfigError
from steercmp.lm.memory import gib
from steercmp.plugin_manager import PluginSet
from steercmp.run.validate import validate_experiment
from steercmp.stats.power import mde_in_sd, min_p_value, prompts_to_reach

GPU_80GB = 80 * 10**9
#: working memory on top of weights while a stage runs (activations, KV cache, logits);
#: measured on the embedded run as < 25% of the largest model, see the bench memory table
OVERHEAD = 0.25


def describe_plan(experiment: Experiment, plugins: PluginSet) -> str:
    battery = experiment.battery
    methods = validate_experiment(experiment, plugins).methods
    info = known_model(experiment.model.id)
    bpp = DTYPE_BYTES.get(experiment.model.dtype, 4)
    base_bytes = info.params * bpp if info and info.params else None
    lines = [f"experiment {experiment.name} ({experiment.source})",
             f"  model {experiment.model.id}  dtype {experiment.model.dtype}  layer {experiment.layer}"
             + (f" of {info.layers}" if info and info.layers else ""),
             f"  battery {battery.source}: {len(battery)} prompts",
             f"  alphas {list(experiment.alphas)}  scalings {list(experiment.scalings)}  "
             f"decision alphas {list(experiment.decision_alphas)}",
             f"  controls {list(experiment.controls)} (+ unrelated_edit from every method)",
             "stages (one model resident at a time):"]
    stages: list[tuple[str, str, int | None]] = [("extract", f"base {experiment.model.id}", base_bytes)]
    for spec in experiment.methods:
        method = methods[spec.key]
        resources = list(method.resources())
        if not resources:
            stages.append((f"propose:{spec.key}", "base model (already resident)", base_bytes))
        for r in resources:
            est = r.estimated_bytes
            stages.append((f"propose:{spec.key}:{r.name}", f"{r.kind} {r.source}", est))
    stages.append(("score", f"base {experiment.model.id}", base_bytes))
    if experiment.completions.enabled:
        stages.append(("completions", f"base {experiment.model.id}", base_bytes))
    stages.append(("report", "no model", 0))
    for name, what, est in stages:
        lines.append(f"  {name:<34} loads {what:<60} weights {gib(est) if est is not None else 'unknown'}")
    known = [e for _, _, e in stages if e is not None]
    if not known:
        raise ConfigError("no model size is known for this plan", where=f"{experiment.source}: model.id",
                          fix="use a known model id or a local directory with config.json")
    largest = max(known)
    peak = largest * (1 + OVERHEAD)
    n_cells = len(battery) * len(experiment.methods) * (2 + len(experiment.controls)) \
        * len(experiment.alphas) * len(experiment.scalings)
    lines += [f"cells: {n_cells} (prompts x methods x conditions x alphas x scalings)",
              f"largest single model: {gib(largest)}; estimated staged peak: {gib(peak)} "
              f"(<= {1 + OVERHEAD:.2f}x the largest model)",
              f"fits one 80 GB GPU: {'yes' if peak < GPU_80GB else 'no (use device_map: auto across GPUs)'}"]
    lines += power_prediction(len(battery), experiment.decision_level)
    return "\n".join(lines)


def power_prediction(n: int, level: float) -> list[str]:
    """What the pre-declared test can show with ``n`` usable prompts, before any data exist."""
    min_p = min_p_value(n)
    need = prompts_to_reach(level)
    head = (f"power (decision level {level:g}, one-sided exact sign-flip test, intersection-union over "
            f"controls): {n} prompts -> smallest possible p {min_p:.3g}")
    if min_p >= level:
        return [head, f"  UNDERPOWERED: no outcome can pass; every verdict will read 'underpowered'. "
                      f"Use at least {need} usable prompts."]
    mde = mde_in_sd(n, level=level)
    return [head, f"  detects a mean paired difference of ~{mde:.2f} per-prompt SDs with 80% power "
                  f"(normal differences; the report re-estimates it from the observed spread)",
            f"  a method that drops prompts (NLA strict selection, fidelity gate) needs at least {need} "
            f"usable ones for a verdict other than 'underpowered'"]
