"""The propose stage: each method's proposals (deltas or prompt texts), checked against the
proposal contract and stored; and the cell book the later stages build from them."""

from __future__ import annotations

import time

from steercmp.api import PROPOSAL_FAMILIES, PromptContext, Proposal
from steercmp.errors import ConfigError
from steercmp.run.cells import CellBook, FamilyForms, method_cells
from steercmp.run.proposals import ProposalContract, check_proposals, load_proposals, save_proposals
from steercmp.run.runtime import RunnerRuntime
from steercmp.run.stage_context import StageContext


def stage_propose(ctx: StageContext, contexts: list[PromptContext], run: bool = True) -> dict[str, list[Proposal]]:
    """Every method's proposals, in the experiment's order; finished methods are read back, and a
    method that fails is recorded (:meth:`StageContext.fail`) without costing the others."""
    t = time.perf_counter()
    out: dict[str, list[Proposal]] = {}
    for key in ctx.method_order:
        method = ctx.methods[key]
        stage_key = ctx.keys.propose(key)
        tpath, jpath = ctx.rundir.proposal_tensors(key), ctx.rundir.proposal_records(key)
        if ctx.reusable(f"propose:{key}", stage_key, tpath, jpath) or (not run and jpath.exists()):
            ctx.ledger.reused.append(f"propose:{key}")
            out[key] = load_proposals(ctx.rundir, key)
            continue
        if not run:
            raise ConfigError(f"no proposals for method {key!r} in this run directory",
                              where=str(ctx.run_dir), fix="run `--step propose` first")
        ctx.log(f"[propose] {key}")
        t_method = time.perf_counter()
        runtime = RunnerRuntime(ctx.resources, ctx.rundir, ctx.run_settings(key), progress=ctx.progress,
                                fresh=ctx.fresh)
        try:
            contract = ProposalContract(scalings=ctx.sweep.scalings, intervention=method.intervention,
                                        families=(*PROPOSAL_FAMILIES, *method.companion_families))
            proposals = check_proposals(key, method.propose(contexts, runtime), contexts, contract)
        except Exception as exc:
            # one failing method must not cost the others' results: record it and go on
            ctx.fail(key, "proposing", exc)
            continue
        save_proposals(ctx.rundir, key, proposals)
        ctx.mark_done(f"propose:{key}", stage_key)
        out[key] = proposals
        ctx.ledger.timings[f"propose:{key}"] = time.perf_counter() - t_method
        ctx.log(f"  {key} proposed in {ctx.ledger.timings[f'propose:{key}']:.1f} s")
    ctx.ledger.timings["propose"] = time.perf_counter() - t
    return out


def cell_book(ctx: StageContext, contexts: list[PromptContext], proposals: dict[str, list[Proposal]]) -> CellBook:
    """The cells of every proposed method, built on first use (a method whose cells fail to
    build is recorded and leaves the stages that need them)."""
    def build(key: str, forms: dict[str, FamilyForms]) -> list:  # type: ignore[type-arg]
        return method_cells(ctx.sweep, key, ctx.methods[key], ctx.controls, contexts, proposals[key],
                            ctx.resources.base().tokenizer, forms)

    keys = [k for k in ctx.method_order if k in proposals]
    return CellBook(keys, build, lambda key, exc: ctx.fail(key, "building its cells", exc))


__all__ = ["cell_book", "stage_propose"]
