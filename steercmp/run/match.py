"""The matched-dose stage: every method and control at the same side-effect cost, per prompt.

For each prompt the stage builds its "arms" (every direction the verdict compares), finds for
each the dose at which its off-target KL equals the prompt's budget (:mod:`steercmp.score.dose`),
and records the scores at that dose in ``matched.parquet``:

- the budget: the positive control's own off-target KL on the prompt (a patch, alpha 1), or
  ``decision.max_kl``; it reads no outcome;
- per activation method: the target, ``unrelated_edit`` and every ``per_method`` control
  (``wrong_position``, ``paraphrase_edit``, ...), each dose-matched; the positive control's
  target is the patch itself (``fixed``); a fixed-alpha proposal is kept at its alpha;
- per prompting method: its rows as scored (``not_dose_matched``: a prompt has no dose), with
  the off-target KL measured against the original prompt's distribution;
- ``shared`` controls (``random_delta``, ``random_donor``): K draws per prompt, dose-matched
  once and reported under every method (their direction does not depend on the method);
- ``noop``: the unsteered model.
Prompts a method dropped, fell back on or gated are written with their status and no score: the
intention-to-treat analysis counts them as no-op (:mod:`steercmp.stats.matched`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import polars as pl
import torch

from steercmp.api import (
    TARGET_CONDITION,
    UNRELATED_CONDITION,
    Control,
    Method,
    PromptContext,
    Proposal,
)
from steercmp.hashing import make_generator
from steercmp.lm.load import LoadedModel
from steercmp.run.cells import Cell
from steercmp.run.sweep_settings import SweepSettings
from steercmp.schemas import COMPLETIONS, read_table
from steercmp.score.dose import DEFAULT_MAX_KL, Arm, match_doses
from steercmp.score.forms import FamilyForms, family_forms
from steercmp.score.full_forward import ScoreRow
from steercmp.score.sample import COMPLETION_SCHEMA, Sampling, sample_completions
from steercmp.score.sweep import KL_OFFTARGET, KL_UNSTEERED, score_rows_fast

#: proposal statuses whose deltas the verdict injects (the rest count as no-op under ITT)
SCORED_STATUSES = ("ok", "editable")
SHARED = "*"  # the method key under which shared controls are computed once


@attrs.frozen(eq=False)
class Direction:
    """One direction to score at a dose: ``fixed`` is a multiplier that is not matched (a patch,
    a fixed-alpha operation); ``status`` the proposal's status."""

    method: str
    condition: str
    draw: int
    proposal: Proposal
    position: int
    fixed: float | None = None

    @property
    def delta(self) -> torch.Tensor:
        assert self.proposal.delta is not None
        return self.proposal.delta.float()


@attrs.frozen
class Contenders:
    """Everything a prompt's directions are drawn from: the run's methods (by key), its controls and
    the key of its positive control (``None`` without one)."""

    methods: Mapping[str, Method]
    controls: Mapping[str, Control]
    positive_control: str | None


def positive_control(methods: Mapping[str, Method], proposals: Mapping[str, Sequence[Proposal]]) -> str | None:
    """The key of the run's positive control: the method whose proposals say ``meta.role``."""
    for key in methods:
        if any(p.meta.get("role") == "positive_control" for p in proposals.get(key, ())):
            return key
    return None


def _derive(control: Control, source: Proposal, ctx: PromptContext, seed: int, key: str) -> Proposal:
    return control.derive(source, ctx, make_generator(seed, key, ctx.prompt.id, control.name))


def directions(sweep: SweepSettings, field: Contenders, ctx: PromptContext, others: Sequence[PromptContext],
               proposals: Mapping[str, Mapping[str, Proposal]],
               parts: Sequence[str]) -> tuple[list[Direction], list[dict[str, Any]]]:
    """The directions of some parts of the prompt (methods' keys, and :data:`SHARED` for the
    shared controls), and the rows that need no matching (dropped, gated, not applicable) as
    ``(method, condition, status)`` records."""
    out: list[Direction] = []
    skipped: list[dict[str, Any]] = []
    pid, controls, pc = ctx.prompt.id, field.controls, field.positive_control
    for key, method in field.methods.items():
        if key not in parts or method.intervention != "activation" or key not in proposals:
            continue
        props = proposals[key]
        target = props.get("edited")
        status = target.status if target is not None else "dropped"
        if target is None or status not in SCORED_STATUSES:
            skipped.append({"method": key, "condition": TARGET_CONDITION, "status": status})
            continue
        # the positive control's patch sets the budget, unmatched: once, at its fixed alpha (1 = a patch)
        fixed = _patch_alpha(target) if key == pc else target.fixed_alpha
        out.append(Direction(key, TARGET_CONDITION, 0, target, _pos(target, ctx), fixed))
        unrelated = props.get("unrelated")
        if unrelated is not None and unrelated.delta is not None and unrelated.status in SCORED_STATUSES:
            out.append(Direction(key, UNRELATED_CONDITION, 0, unrelated, _pos(unrelated, ctx)))
        for cname, control in controls.items():
            if control.matching != "per_method":
                continue
            if not control.applies_to(method):
                skipped.append({"method": key, "condition": cname, "status": "not_applicable"})
                continue
            source = target if control.companion is None else props.get(control.companion)
            if source is None or source.status == "dropped" or source.delta is None:
                skipped.append({"method": key, "condition": cname, "status": "dropped"})
                continue
            derived = _derive(control, source, ctx, sweep.seed, key)
            if derived.delta is None or derived.status == "dropped":
                skipped.append({"method": key, "condition": cname, "status": "dropped"})
                continue
            out.append(Direction(key, cname, 0, derived, _pos(derived, ctx)))
    for cname, control in controls.items():
        if SHARED not in parts or control.matching != "shared":
            continue
        draws = sweep.random_draws
        if cname == "random_donor":  # distinct donors only
            draws = min(draws, max(len(others) - 1, 0))
        for k in range(draws):
            derived = control.derive_shared(ctx, others, make_generator(sweep.seed, "shared", cname, pid, k), k)
            if derived.delta is not None and derived.status != "dropped":
                out.append(Direction(SHARED, cname, k, derived, _pos(derived, ctx)))
    return out, skipped


def _patch_alpha(target: Proposal) -> float:
    """The positive control's multiplier: its fixed alpha, else 1 (a patch)."""
    return target.fixed_alpha if target.fixed_alpha is not None else 1.0


def _pos(p: Proposal, ctx: PromptContext) -> int:
    return p.position if p.position is not None else ctx.inject_pos


class _Scorer:
    """Scores (direction, multiplier) pairs of one prompt in batches and keeps every result."""

    def __init__(self, lm: LoadedModel, sweep: SweepSettings, ctx: PromptContext, forms: FamilyForms):
        self.lm, self.sweep, self.ctx, self.forms = lm, sweep, ctx, forms
        self.results: list[dict[str, float]] = []
        self.memo: dict = {}  # the prompt's prepared context, shared by every round of the search

    def __call__(self, items: Sequence[tuple[Direction | None, float]]) -> list[dict[str, float]]:
        ctx = self.ctx
        rows = [ScoreRow(ctx.input_ids, ctx.score_pos, self.forms,
                         d.delta if d is not None else torch.zeros(ctx.d_model), float(m),
                         d.position if d is not None else ctx.inject_pos, "raw") for d, m in items]
        masses = score_rows_fast(self.lm, self.sweep.layer, rows, batch_size=self.sweep.batch_size, kl=True,
                                 memo=self.memo)
        out = [{k: float(v[i]) for k, v in masses.items()} for i in range(len(rows))]
        self.results.extend(out)
        return out


def _budget(score: _Scorer, max_kl: float | None, ctx: PromptContext,
            proposals: Mapping[str, Mapping[str, Proposal]], pc: str | None) -> tuple[dict[str, float], dict[str, float] | None, float, str]:
    """The unsteered row, the positive control's patch row and the prompt's budget. Always
    scored as one batch of its own, so every part of the prompt reads the same numbers."""
    target = proposals.get(pc, {}).get("edited") if pc is not None else None
    patch = None
    if pc is not None and target is not None and target.delta is not None and target.status in SCORED_STATUSES:
        patch = Direction(pc, TARGET_CONDITION, 0, target, _pos(target, ctx), _patch_alpha(target))
    res = score([(None, 0.0), *([(patch, patch.fixed)] if patch is not None else [])])
    noop, patch_res = res[0], (res[1] if patch is not None else None)
    if max_kl is not None:
        return noop, patch_res, max_kl, "max_kl"
    if pc is not None:
        return noop, patch_res, (patch_res[KL_OFFTARGET] if patch_res is not None else float("nan")), \
            "positive_control"
    return noop, patch_res, DEFAULT_MAX_KL, "default_max_kl"


def match_prompt(lm: LoadedModel, sweep: SweepSettings, field: Contenders, ctx: PromptContext,
                 others: Sequence[PromptContext], proposals: Mapping[str, Mapping[str, Proposal]],
                 prompt_rows: Sequence[Mapping[str, Any]],
                 parts: Sequence[str]) -> tuple[list[dict[str, Any]], list[Direction]]:
    """``matched.parquet`` records of some parts of a prompt (see the module docstring), matched
    in one batch: each method's own rows (no-op, target, its controls) and, for :data:`SHARED`,
    the shared controls' draws under the method key ``*`` (:func:`expand_shared` copies them to
    every method). Also returns the directions they were matched for (the matched completions
    inject the same ones). Parts are independent, so adding a method reuses every other part."""
    forms = family_forms(lm.tokenizer, ctx.prompt.families)
    pc = field.positive_control
    score = _Scorer(lm, sweep, ctx, forms)
    noop, patch_res, budget, source = _budget(score, sweep.max_kl, ctx, proposals, pc)
    dirs, skipped = directions(sweep, field, ctx, others, proposals, parts)
    fixed = [d for d in dirs if d.fixed is not None]
    # the patch was scored with the budget; every other fixed-alpha direction is scored here
    patch_dirs = [d for d in fixed if d.method == pc and d.condition == TARGET_CONDITION]
    rest = [d for d in fixed if d not in patch_dirs]
    fixed_res = {id(d): patch_res for d in patch_dirs}
    if rest:
        fixed_res.update(zip(map(id, rest), score([(d, d.fixed) for d in rest]), strict=True))
    free = [d for d in dirs if d.fixed is None]
    site_norm = float(ctx.activation.float().norm())
    arms = [Arm(float(d.delta.norm()), site_norm) for d in free]
    ok_budget = budget if math.isfinite(budget) and budget > 0 else 0.0
    offset = len(score.results)
    shared = sorted({d.condition for d in free if d.method == SHARED})
    matches = match_doses(arms, [ok_budget] * len(arms),
                          lambda req: [r[KL_OFFTARGET] for r in score([(free[a], m) for a, m in req])],
                          groups=[shared.index(d.condition) if d.method == SHARED else None for d in free])

    def record(method: str, condition: str, draw: int, status: str, res: Mapping[str, float] | None,
               multiplier: float | None, d: Direction | None, evals: int) -> dict[str, Any]:
        fam = {f: (res[f] if res is not None else None) for f in ("edited", "original", "unrelated")}
        meta = d.proposal.meta if d is not None else {}
        return {"prompt_id": ctx.prompt.id, "method": method, "condition": condition, "draw": draw,
                "status": status, "budget": budget, "budget_source": source, "multiplier": multiplier,
                "ratio": (None if multiplier is None or d is None or site_norm == 0
                          else multiplier * float(d.delta.norm()) / site_norm),
                "delta_norm": float(d.delta.norm()) if d is not None else None,
                "kl_offtarget": res[KL_OFFTARGET] if res is not None else None,
                "kl_unsteered": res[KL_UNSTEERED] if res is not None else None,
                "logmass_edited": fam["edited"], "logmass_original": fam["original"],
                "logmass_unrelated": fam["unrelated"],
                "score": None if res is None else res["edited"] - res["original"], "evals": evals,
                "oracle_assisted": bool(meta.get("oracle_assisted", False))}

    out = [record(part, "noop", 0, "ok", noop, 0.0, None, 1) for part in parts if part != SHARED]
    out += [record(d.method, d.condition, d.draw, "fixed", fixed_res[id(d)], d.fixed, d, 1) for d in fixed]
    for d, m in zip(free, matches, strict=True):
        res = score.results[offset + m.point.index] if m.point is not None else None
        out.append(record(d.method, d.condition, d.draw, m.status, res, m.point.multiplier if m.point else None,
                          d, m.evals))
    out += [record(s["method"], s["condition"], 0, s["status"], None, None, None, 0) for s in skipped]
    for r in prompt_rows:  # prompting methods: scored in the sweep, no dose
        if r["method"] in parts:
            out.append({**record(r["method"], r["condition"], 0, "not_dose_matched", None, None, None, 0),
                        **{k: r[k] for k in ("logmass_edited", "logmass_original", "logmass_unrelated", "score",
                                             "kl_offtarget", "kl_unsteered")}})
    return out, dirs


def expand_shared(frame: pl.DataFrame, activation_methods: Sequence[str]) -> pl.DataFrame:
    """The shared part's rows (method ``*``) copied under every method that injects, after the
    methods' own rows: the same bar for each."""
    shared = frame.filter(pl.col("method") == SHARED)
    own = frame.filter(pl.col("method") != SHARED)
    copies = [shared.with_columns(pl.lit(k).alias("method")) for k in activation_methods]
    return pl.concat([own, *copies], how="vertical") if copies else own


def prompt_method_rows(cells: Any, methods: Mapping[str, Method], pid: str) -> list[dict[str, Any]]:
    """The scored target and unrelated rows of prompting methods for one prompt (any alpha: a
    prompt's row does not depend on it)."""
    keys = [k for k, m in methods.items() if m.intervention != "activation"]
    if cells is None or not keys:
        return []
    rows = (cells.filter((pl.col("prompt_id") == pid) & pl.col("method").is_in(keys)
                         & pl.col("condition").is_in([TARGET_CONDITION, UNRELATED_CONDITION])
                         & pl.col("score").is_not_null())
            .unique(subset=["method", "condition"], keep="first", maintain_order=True))
    if "kl_offtarget" not in rows.columns:
        rows = rows.with_columns(pl.lit(None, dtype=pl.Float64).alias("kl_offtarget"))
    return rows.to_dicts()


def prompt_method_completions(rundir: Any, methods: Mapping[str, Method]) -> Any:
    """Prompting methods' completions (target and unrelated) from the completions stage: a prompt
    has no dose, so the matched-dose check reads them as sampled (one alpha's rows: every alpha of
    a prompting row is the same text). ``None`` when there are none."""
    keys = [k for k, m in methods.items() if m.intervention != "activation"]
    if not keys or not rundir.completions.exists():
        return None
    comp = read_table(rundir.completions, COMPLETIONS, fix="delete the file or rerun with --fresh").filter(
        pl.col("method").is_in(keys) & pl.col("condition").is_in([TARGET_CONDITION, UNRELATED_CONDITION]))
    if comp.is_empty():
        return None
    return comp.filter(pl.col("alpha") == comp["alpha"].min()).select(list(COMPLETION_SCHEMA))


def matched_completions(lm: LoadedModel, sampling: Sampling, families: Mapping[str, Any], ctx: PromptContext,
                        rows: Sequence[Mapping[str, Any]], dirs: Sequence[Direction],
                        baseline: Mapping[tuple[tuple[int, ...], int], str]) -> Any:
    """Completions of some parts of a prompt at the matched doses (``rows`` and ``dirs`` from
    :func:`match_prompt`), in one sampling batch: each method's no-op (the prompt's shared
    unsteered samples), target and controls; for the shared part, each shared control's first
    draw (sampled once, under ``*``)."""
    found = {(d.method, d.condition, d.draw): d for d in dirs}
    forms = FamilyForms(forms={}, branches=((),), entries={})  # sampling reads no family forms

    def cell(method: str, condition: str, d: Direction | None, multiplier: float) -> Cell:
        delta = d.delta if d is not None else torch.zeros(ctx.d_model)
        pos = d.position if d is not None else ctx.inject_pos
        row = ScoreRow(ctx.input_ids, ctx.score_pos, forms, delta, multiplier, pos, "raw")
        return Cell(ctx.prompt.id, method, condition, multiplier, "raw", "ok", pos, ctx.inject_pos, ctx.score_pos,
                    float(delta.norm()), {}, row, baseline=d is None)

    picked: list[Cell] = []
    for r in rows:
        if r["condition"] == "noop" and r["status"] == "ok":
            picked.append(cell(r["method"], "noop", None, 0.0))
            continue
        if r["status"] not in ("matched", "fixed", "off_budget", "unreachable") or r["multiplier"] is None:
            continue
        if r["method"] == SHARED and r["draw"] != 0:
            continue
        d = found.get((r["method"], r["condition"], r["draw"]))
        if d is not None:
            picked.append(cell(r["method"], r["condition"], d, float(r["multiplier"])))
    if not picked:
        return pl.DataFrame(schema=COMPLETION_SCHEMA)
    return sample_completions(lm, sampling, picked, families, baseline=baseline)


__all__ = ["SHARED", "Contenders", "directions", "expand_shared", "match_prompt", "matched_completions", "positive_control",
           "prompt_method_completions", "prompt_method_rows"]
