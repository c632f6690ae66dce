"""Scale-out: score and sample an experiment's prompts across processes, then merge.

``steercmp run --processes N`` (or N ranks under ``accelerate launch -m steercmp run``) first
runs ``extract`` and ``propose`` ONCE, over the whole battery, in one process (rank 0): anything
a method computes across prompts (an SAE's feature scales, diffmean's means over every couplet,
an NLA baseline) is then computed on the same data as in a single run, and a shard can never
change a proposal. The battery is split into N contiguous blocks of prompts; each worker runs
the ordinary :class:`steercmp.run.runner.Runner` for ``score`` and ``completions`` on its block,
reading its prompts' contexts and proposals, in ``<run>/shards/<k>/`` (with its own units, so a
rerun resumes per shard). The parent merges ``cells.parquet`` and ``completions.parquet`` into
the single-process row order (byte-for-byte equal), writes ``stages.json`` with the
single-process stage keys (a later single-process run reuses the merged results) and a
``manifest.json`` whose ``memory`` and ``timings_seconds`` hold every shard's readings.

Why scoring and sampling equal a single run: every random choice derives from the run seed and a
row's identity, never from call order; scoring batches rows per prompt and sampling per group of
prompts fixed by the battery (``completions.prompt_group``; shards are cut between groups), so a
prompt's rows meet the same batches in either layout. Keep ``batch_size`` fixed (not ``auto``)
when byte equality matters: ``auto`` reads free memory.

With ``accelerate launch``, rank 0 proposes, every rank scores its shard (``device`` ``cuda`` maps
rank k to its GPU) and rank 0 merges, with barriers between.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import polars as pl
import torch

from steercmp.config import Experiment
from steercmp.plugin_manager import DEFAULT_PLUGINS, PluginSet, build_plugin_manager
from steercmp.run.keys import STAGES, RunKeys, sample_groups
from steercmp.run.rundir import (
    RunDir,
    read_json,
    read_tensors,
    write_json,
    write_parquet,
    write_tensors,
    write_text,
)
from steercmp.run.runner import Runner
from steercmp.run.validate import validate_experiment
from steercmp.schemas import CELLS, COMPLETIONS, read_table


@attrs.frozen
class PluginSpec:
    """How to rebuild the plugin set in a worker (a PluginSet itself does not cross processes)."""

    builtins: tuple[str, ...] = tuple(DEFAULT_PLUGINS)
    entry_points: bool = True
    plugins_dir: str | None = None

    def build(self) -> PluginSet:
        return build_plugin_manager(self.builtins, entry_points=self.entry_points,
                                    plugins_dir=self.plugins_dir)


def shard_prompt_ids(prompt_ids: Sequence[str], processes: int, align: int = 1) -> list[list[str]]:
    """Contiguous, near-equal blocks of prompt ids (block k before block k+1 in battery order),
    cut only between blocks of ``align`` prompts: the sampling groups, whose prompts' unsteered
    completions are drawn in one batch, never straddle two shards."""
    if processes < 1:
        raise ValueError("processes must be >= 1")
    groups = sample_groups(prompt_ids, align)
    n = len(groups)
    processes = min(processes, n) or 1
    bounds = [round(k * n / processes) for k in range(processes + 1)]
    return [[pid for g in groups[bounds[k]:bounds[k + 1]] for pid in g] for k in range(processes)]


SHARD_STAGES = ("score", "completions")
WHOLE_BATTERY_STAGES = ("extract", "propose")
#: run in the parent on the merged run directory (random donors come from the whole battery)
AFTER_MERGE_STAGES = ("match",)


def _run_here(experiment: Experiment, plugins: PluginSpec, run_dir: str | Path, todo: Sequence[str], *,
              fresh: bool, device: str | None) -> list[str]:
    """Run ``todo`` on every prompt, in this process; returns the one-line failures."""
    if device is not None:
        experiment = attrs.evolve(experiment, model=attrs.evolve(experiment.model, device=device))
    runner = Runner(experiment, plugins.build(), Path(run_dir), fresh=fresh, progress=False,
                    log=lambda msg: print(f"[all prompts] {msg}", flush=True))
    runner.run(todo)
    return [f.one_line() for f in runner.failures]


def run_whole_battery(experiment: Experiment, plugins: PluginSpec, run_dir: str | Path, steps: Sequence[str], *,
                      fresh: bool = False, device: str | None = None) -> list[str]:
    """``extract`` and ``propose`` on every prompt, in this process, into ``run_dir``."""
    todo = [s for s in steps if s in WHOLE_BATTERY_STAGES]
    return _run_here(experiment, plugins, run_dir, todo, fresh=fresh, device=device) if todo else []


def prepare_shard(experiment: Experiment, run_dir: str | Path, k: int, prompt_ids: Sequence[str]) -> None:
    """Give shard ``k`` its prompts' contexts, activations and proposals from the whole-battery run."""
    run = RunDir(run_dir)
    shard = run.shard(k)
    keep = set(prompt_ids)
    if not run.contexts.exists():
        return
    tensors = read_tensors(run.activations)
    write_tensors(shard.activations, {pid: t for pid, t in tensors.items() if pid in keep},
                  {"layer": str(experiment.layer), "model": experiment.model.id})
    write_json(shard.contexts, {pid: c for pid, c in read_json(run.contexts).items() if pid in keep})
    for spec in experiment.methods:
        if not run.proposal_records(spec.key).exists():
            continue
        records = [r for r in read_json(run.proposal_records(spec.key)) if r["prompt_id"] in keep]
        ptensors = {name: t for name, t in read_tensors(run.proposal_tensors(spec.key)).items()
                    if name.split("|", 1)[0] in keep}
        write_tensors(shard.proposal_tensors(spec.key), ptensors or {"__empty__": torch.zeros(1)})
        write_json(shard.proposal_records(spec.key), records)


@attrs.frozen
class Shard:
    """Shard ``k`` of a run: its index and the ids of its prompts."""

    k: int
    prompt_ids: tuple[str, ...]


def run_shard(experiment: Experiment, plugins: PluginSpec, run_dir: str | Path, shard: Shard,
              steps: Sequence[str] = SHARD_STAGES, *, fresh: bool = False,
              threads: int | None = None, device: str | None = None) -> list[str]:
    """Score and sample one shard's prompts (a worker's whole job) from the proposals the
    whole-battery step wrote; returns the one-line failures of its methods."""
    k, prompt_ids = shard.k, shard.prompt_ids
    if threads:
        torch.set_num_threads(threads)
    if device is not None:
        experiment = attrs.evolve(experiment, model=attrs.evolve(experiment.model, device=device))
    prepare_shard(experiment, run_dir, k, prompt_ids)
    out = RunDir(run_dir).shard(k).root
    runner = Runner(experiment.with_prompts(prompt_ids), plugins.build(), out, fresh=fresh, progress=False,
                    log=lambda msg: print(f"[shard {k}] {msg}", flush=True))
    runner.run([s for s in steps if s in SHARD_STAGES])
    return [f.one_line() for f in runner.failures]


def _worker(payload: tuple[Any, ...]) -> list[str]:
    experiment, plugins, run_dir, k, ids, steps, fresh, threads, device = payload
    return run_shard(experiment, plugins, run_dir, Shard(k, tuple(ids)), steps, fresh=fresh, threads=threads,
                     device=device)


def _worker_device(experiment: Experiment, k: int) -> str | None:
    """Worker k's device: ``cuda:k mod n_gpus`` for a CUDA experiment without a device_map."""
    if experiment.model.device_map is not None or experiment.model.device not in ("cuda", "auto"):
        return None
    n = torch.cuda.device_count()
    return f"cuda:{k % n}" if n else None


def run_sharded(experiment: Experiment, run_dir: str | Path, processes: int, *,
                plugins: PluginSpec = PluginSpec(), steps: Sequence[str] = STAGES,
                fresh: bool = False, threads: int | None = None) -> tuple[pl.DataFrame | None, list[str]]:
    """Propose on the whole battery here, then score and sample ``processes`` shards of prompts
    in worker processes, and merge into ``run_dir``. Returns ``(cells or None, failures)``.
    Threads per worker default to the cores divided by the number of workers."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    failures = run_whole_battery(experiment, plugins, run_dir, steps, fresh=fresh)
    shards = shard_prompt_ids([p.id for p in experiment.battery.prompts], processes,
                              experiment.completions.prompt_group)
    if any(s in steps for s in SHARD_STAGES):
        threads = threads or max(1, (os.cpu_count() or 1) // len(shards))
        payloads = [(experiment, plugins, str(run_dir), k, block, tuple(steps), fresh, threads,
                     _worker_device(experiment, k)) for k, block in enumerate(shards)]
        if len(shards) == 1:
            results = [_worker(payloads[0])]
        else:
            with mp.get_context("spawn").Pool(len(shards)) as pool:
                results = pool.map(_worker, payloads)
        failures += [f for r in results for f in r if f not in failures]
    cells = merge_shards(experiment, run_dir, len(shards), plugins=plugins,
                         wall_seconds=time.perf_counter() - t)
    failures += [f for f in run_after_merge(experiment, plugins, run_dir, steps, fresh=fresh) if f not in failures]
    return cells, failures


def run_after_merge(experiment: Experiment, plugins: PluginSpec, run_dir: str | Path, steps: Sequence[str], *,
                    fresh: bool = False, device: str | None = None) -> list[str]:
    """``match`` on the merged run directory, in this process (it compares every prompt with the
    battery's other prompts, so it is never sharded); the merged manifest keeps the shards'
    readings and gains this stage's."""
    run = RunDir(run_dir)
    todo = [s for s in steps if s in AFTER_MERGE_STAGES]
    if not todo or not run.cells.exists():
        return []
    merged = read_json(run.manifest) if run.manifest.exists() else {}
    failures = _run_here(experiment, plugins, run_dir, todo, fresh=fresh, device=device)
    if merged:
        own = read_json(run.manifest)
        merged["timings_seconds"] = {**merged.get("timings_seconds", {}),
                                     **{k: v for k, v in own.get("timings_seconds", {}).items() if k.startswith("match")}}
        merged["memory"] = [*merged.get("memory", []), *[m for m in own.get("memory", []) if m.get("stage") == "match"]]
        merged["stage_keys"] = own.get("stage_keys", merged.get("stage_keys"))
        write_json(run.manifest, merged)
    return failures


def run_rank(experiment: Experiment, run_dir: str | Path, *, plugins: PluginSpec = PluginSpec(),
             steps: Sequence[str] = STAGES, fresh: bool = False) -> tuple[pl.DataFrame | None, bool]:
    """One rank under ``accelerate launch``: rank 0 proposes on the whole battery, every rank
    scores its shard, rank 0 merges. Returns ``(merged cells or None, is_main_process)``. Uses
    ``accelerate.PartialState`` for rank, world size, device and the barriers."""
    from accelerate import PartialState

    # on CPU ranks (no GPU, or device cpu) accelerate needs cpu=True to join the process group
    # (gloo); without it every rank reads as a lone main process and all write the run directory
    state = PartialState(cpu=experiment.model.device == "cpu" or not torch.cuda.is_available())
    device = str(state.device) if experiment.model.device in ("auto", "cuda") else None
    if state.is_main_process:
        run_whole_battery(experiment, plugins, run_dir, steps, fresh=fresh, device=device)
    state.wait_for_everyone()
    shards = shard_prompt_ids([p.id for p in experiment.battery.prompts], state.num_processes,
                              experiment.completions.prompt_group)
    if state.process_index < len(shards) and any(s in steps for s in SHARD_STAGES):
        run_shard(experiment, plugins, run_dir, Shard(state.process_index, tuple(shards[state.process_index])),
                  steps, fresh=fresh, device=device)
    state.wait_for_everyone()
    cells = None
    if state.is_main_process:
        cells = merge_shards(experiment, Path(run_dir), len(shards), plugins=plugins)
        run_after_merge(experiment, plugins, run_dir, steps, fresh=fresh, device=device)
    state.wait_for_everyone()
    return cells, bool(state.is_main_process)


# ----------------------------------------------------------------------------- merging
def merge_shards(experiment: Experiment, run_dir: Path, n_shards: int, *, plugins: PluginSpec = PluginSpec(),
                 wall_seconds: float | None = None) -> pl.DataFrame | None:
    """Merge ``<run>/shards/0..n-1`` into ``run_dir`` in the single-process layout and order."""
    run = RunDir(run_dir)
    shards = [run.shard(k) for k in range(n_shards)]
    battery = experiment.battery
    order = {p.id: i for i, p in enumerate(battery.prompts)}
    method_order = {s.key: i for i, s in enumerate(experiment.methods)}
    write_text(run.config, experiment.snapshot())
    done = _merge_stage_keys(shards) | set(run.stage_keys())

    cells = None
    if all(d.cells.exists() for d in shards):
        parts = [read_table(d.cells, CELLS, require_target=False).with_columns(pl.lit(k).alias("__shard"))
                 for k, d in enumerate(shards)]
        merged = pl.concat(parts).with_row_index("__row")
        # single-process order: method (config order), then prompt (battery order), then the
        # condition x scaling x alpha order each shard already wrote
        merged = merged.with_columns(
            pl.col("method").replace_strict(method_order, return_dtype=pl.Int64).alias("__m"),
            pl.col("prompt_id").replace_strict(order, return_dtype=pl.Int64).alias("__p"))
        cells = merged.sort("__m", "__p", "__row", maintain_order=True).drop("__row", "__shard", "__m", "__p")
        write_parquet(run.cells, cells)
    if all(d.completions.exists() for d in shards):
        comp = pl.concat([read_table(d.completions, COMPLETIONS) for d in shards])
        comp = comp.sort("method", "condition", "scaling", "alpha", "prompt_id", "seed", nulls_last=True)
        write_parquet(run.completions, comp)

    _write_full_run_stages(experiment, plugins, run, done)
    _write_manifest(experiment, run, shards, wall_seconds)
    return cells


def _merge_stage_keys(shards: Sequence[RunDir]) -> set[str]:
    """The shard stages (score, completions) every shard finished."""
    states = [{k for k in d.stage_keys() if k in SHARD_STAGES} for d in shards]
    return set.intersection(*states) if states else set()


def _write_full_run_stages(experiment: Experiment, plugins: PluginSpec, run: RunDir, done: set[str]) -> None:
    """Add the single-process keys of the shard stages every shard finished to the ledger the
    whole-battery step wrote (extract, propose), so that a later unsharded ``steercmp run`` on
    the merged directory reuses them."""
    from steercmp.run.provenance import checkpoint_identity

    state = run.stage_keys()
    shard_done = [stage for stage in SHARD_STAGES if stage in done]
    if shard_done:
        validated = validate_experiment(experiment, plugins.build())
        ident = checkpoint_identity(experiment.model.id, experiment.model.revision)
        keys = RunKeys(experiment, validated.methods, validated.controls,
                       {"id": experiment.model.id, "revision": ident.get("revision"), "files": ident.get("files", {})})
        for stage in shard_done:
            state[stage] = keys.all_methods_stage(stage)
    run.write_stage_keys(state)


def _write_manifest(experiment: Experiment, run: RunDir, shards: Sequence[RunDir],
                    wall_seconds: float | None) -> None:
    per_shard = []
    for k, d in enumerate(shards):
        m = read_json(d.manifest) if d.manifest.exists() else {}
        per_shard.append({"shard": k, "prompts": m.get("battery", {}).get("prompts"),
                          "timings_seconds": m.get("timings_seconds", {}), "memory": m.get("memory", [])})
    source = run.manifest if run.manifest.exists() else shards[0].manifest
    base = read_json(source) if source.exists() else {}
    battery = experiment.battery
    base.update({
        "battery": {"source": battery.source, "hash": battery.content_hash(), "prompts": len(battery)},
        "sharding": {"processes": len(shards), "wall_seconds": wall_seconds, "shards": per_shard},
        "memory": [dict(e, shard=s["shard"]) for s in per_shard for e in s["memory"]],
        "timings_seconds": {"shards_wall": wall_seconds} if wall_seconds is not None else {},
    })
    write_json(run.manifest, json.loads(json.dumps(base, default=str)))
