"""``steercmp plan``: validate an experiment and show its stages, models and peak memory.

Nothing is downloaded: model sizes come from a table of known models, a local config.json,
or a method's own estimate (:attr:`steercmp.api.Resource.params`).
"""

from __future__ import annotations

from typing import Any

import attrs

from steercmp.catalog import DTYPE_BYTES, ModelInfo, known_model
from steercmp.config import Experiment
from steercmp.errors import ConfigError
from steercmp.lm.device import dtype_report, resolve_dtype_name
from steercmp.lm.memory import gib, rss_bytes
from steercmp.plugin_manager import PluginSet
from steercmp.run.validate import validate_experiment
from steercmp.score.sweep import BATCH_MEMORY_FRACTION
from steercmp.stats.power import mde_in_sd, min_p_value, prompts_to_reach

#: bytes a fast tokenizer holds per vocabulary entry (measured: Gemma 3's 262,144 entries take 332 MiB)
TOKENIZER_BYTES_PER_TOKEN = 1_330
#: rows of one completion batch (steercmp.score.sample) and of one AV generation batch
COMPLETION_ROWS, AV_ROWS = 64, 8
SCORE_WORKING_FRACTION = BATCH_MEMORY_FRACTION  # the sweep caps its batches at this share of the weights


@attrs.frozen
class StageMemory:
    name: str
    what: str
    weights: int | None
    working: int


def _working(kind: str, info: ModelInfo | None, weights: int | None, bpp: float, seq: int = 64) -> int:
    """Working memory of a stage beyond weights: logits of a batch, KV caches, activations."""
    if weights is None:
        return 0
    vocab = (info.vocab if info and info.vocab else 262_144)
    layers = (info.layers if info and info.layers else 32)
    d = (info.d_model if info and info.d_model else 4096)
    kv = int(layers * 2 * seq * d * bpp)  # upper bound per row: kv width <= d_model
    if kind == "score":
        return int(SCORE_WORKING_FRACTION * weights)
    if kind == "completions":
        return COMPLETION_ROWS * (vocab * 4 * 3 + kv)
    if kind == "av":
        return AV_ROWS * (vocab * 4 * 3 + 4 * kv)
    return int(seq * d * 4 * 16) + vocab * 4 * 3  # one forward: activations and last logits


def _device_capacity(device: str) -> tuple[str, int | None]:
    """The memory the configured device offers: RAM for cpu, the GPU's memory for cuda."""
    import os

    import torch

    if device in ("cuda", "auto") or device.startswith("cuda:"):
        if torch.cuda.is_available():
            idx = int(device.split(":", 1)[1]) if ":" in device else 0
            return f"GPU {torch.cuda.get_device_name(idx)}", int(torch.cuda.get_device_properties(idx).total_memory)
        if device != "auto":
            return "cuda (no GPU visible on this machine)", None
    where = "auto -> cpu here (no GPU visible): this machine's RAM" if device == "auto" else "this machine's RAM"
    try:
        return where, int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return where, None


def describe_plan(experiment: Experiment, plugins: PluginSet) -> str:
    battery = experiment.battery
    methods = validate_experiment(experiment, plugins).methods
    info = known_model(experiment.model.id)
    dtype = resolve_dtype_name(experiment.model.dtype, experiment.model.device)
    bpp = DTYPE_BYTES.get(dtype, 4)
    base_bytes = info.params * bpp if info and info.params else None
    lines = [f"experiment {experiment.name} ({experiment.source})",
             f"  model {experiment.model.id}  dtype {experiment.model.dtype}"
             + (f" ({dtype_report(experiment.model.device)})" if experiment.model.dtype == "auto" else "")
             + f"  layer {experiment.layer}"
             + (f" of {info.layers}" if info and info.layers else ""),
             f"  battery {battery.source}: {len(battery)} prompts",
             f"  alphas {list(experiment.alphas)}  scalings {list(experiment.scalings)}  "
             f"decision alphas {list(experiment.decision_alphas)}",
             f"  controls {list(experiment.controls)} (+ unrelated_edit from every method)",
             "stages (one model resident at a time):"]
    base_what = f"base {experiment.model.id}"
    stages = [StageMemory("extract", base_what, base_bytes, _working("forward", info, base_bytes, bpp))]
    for spec in experiment.methods:
        resources = list(methods[spec.key].resources())
        if not resources:
            stages.append(StageMemory(f"propose:{spec.key}", "base model (already resident)", base_bytes,
                                      _working("forward", info, base_bytes, bpp)))
        for r in resources:
            kind = "av" if r.kind == "nla_av" else "forward"
            stages.append(StageMemory(f"propose:{spec.key}:{r.name}", f"{r.kind} {r.source}", r.estimated_bytes,
                                      _working(kind, info, r.estimated_bytes, r.bytes_per_param)))
    stages.append(StageMemory("score", base_what, base_bytes, _working("score", info, base_bytes, bpp)))
    if experiment.completions.enabled:
        stages.append(StageMemory("completions", base_what, base_bytes, _working("completions", info, base_bytes, bpp)))
    for st in stages:
        lines.append(f"  {st.name:<34} loads {st.what:<58} weights "
                     f"{gib(st.weights) if st.weights is not None else 'unknown':>10}  working {gib(st.working)}")
    lines += artefact_origins(experiment, methods)
    known = [st for st in stages if st.weights is not None]
    if not known:
        raise ConfigError("no model size is known for this plan", where=f"{experiment.source}: model.id",
                          fix="use a known model id or a local directory with config.json")
    baseline = rss_bytes()
    tokenizer = TOKENIZER_BYTES_PER_TOKEN * (info.vocab if info and info.vocab else 262_144)
    top = max(known, key=lambda st: (st.weights or 0) + st.working)
    peak = baseline + tokenizer + (top.weights or 0) + top.working
    largest = max(st.weights or 0 for st in known)
    n_cells = len(battery) * len(experiment.methods) * (2 + len(experiment.controls)) \
        * len(experiment.alphas) * len(experiment.scalings)
    lines += [f"cells: {n_cells} (prompts x methods x conditions x alphas x scalings)",
              f"estimated peak: {gib(peak)} during {top.name} = process baseline {gib(baseline)} (measured now) "
              f"+ tokenizer {gib(tokenizer)} + weights {gib(top.weights or 0)} + working {gib(top.working)} "
              f"(batches, logits, KV caches); largest model {gib(largest)}, one resident at a time"]
    where, capacity = _device_capacity(experiment.model.device)
    if capacity is None:
        lines.append(f"device {experiment.model.device}: {where}; capacity unknown here")
    else:
        verdict = "fits" if peak < 0.9 * capacity else "does NOT fit (use device_map: auto or a larger device)"
        lines.append(f"device {experiment.model.device}: {where} has {gib(capacity)}: the plan {verdict}")
    lines += power_prediction(len(battery), experiment.decision_level)
    lines += whole_rule_prediction(experiment)
    return "\n".join(lines)


def artefact_origins(experiment: Experiment, methods: Any) -> list[str]:
    """Where every checkpoint comes from (nothing loaded or downloaded); the first artefact that
    cannot be had (a missing local path, an uncached HF id while offline) raises ConfigError."""
    from steercmp.lm.origin import model_origin

    lines = ["artefacts (where each comes from):",
             f"  {'base model':<34} {model_origin(experiment.model.id, experiment.model.revision, where=f'{experiment.source}: model.id')}"]
    for spec in experiment.methods:
        for r in methods[spec.key].resources():
            if r.origin is not None:
                lines.append(f"  {spec.key + ':' + r.name:<34} {r.origin()}")
    return lines


def whole_rule_prediction(experiment: Any) -> list[str]:
    """Power of the matched-dose rule (every score check and its CI) at ``decision.min_effect``,
    before any data: normal per-prompt differences of a few spreads, one check per verdict
    control (no-op, unrelated_edit and the configured controls but the descriptive round trip)."""
    from steercmp.stats.matched import planned_power

    n = len(experiment.battery)
    checks = 2 + len([c for c in experiment.controls if c not in ("noop", "round_trip")])
    e = experiment.decision_min_effect
    parts = [f"SD {sd:g}: {planned_power(n, checks, min_effect=e, sd=sd, level=experiment.decision_level):.0%}"
             for sd in (0.5, 1.0, 2.0)]
    budget = ("the positive control's own off-target KL per prompt" if experiment.decision_max_kl is None
              else f"{experiment.decision_max_kl:g} nats")
    return [f"matched-dose verdict: budget {budget}, {experiment.decision_random_draws} draws per random control, "
            f"min_effect {e:g} nats",
            f"  power of the whole rule ({checks} score checks, CI above 0) at min_effect with {n} prompts, "
            f"per-prompt difference {', '.join(parts)} (intention-to-treat: every prompt counts)"]


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
