"""Cells: every prompt x method x condition x alpha x scaling, and how one unit of them scores.

A method's proposals become cells here: the target and unrelated proposals, plus each control's
derivation from the target. A (method, prompt) block of cells is one resumable unit; inside it,
every row that is the unsteered model (alpha 0 or a zero delta) scores once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from steercmp.api import (
    TARGET_CONDITION,
    UNRELATED_CONDITION,
    Control,
    Method,
    PromptContext,
    Proposal,
)
from steercmp.errors import NumericalError
from steercmp.hashing import make_generator
from steercmp.lm.load import LoadedModel
from steercmp.lm.prompts import TokenizedPrompt, tokenize_prompt
from steercmp.run.sweep_settings import SweepSettings
from steercmp.schemas import (
    CELL_SCHEMA as CELL_SCHEMA,  # the columns of cells.parquet (re-exported)
)
from steercmp.score.forms import FamilyForms, family_forms
from steercmp.score.full_forward import ScoreRow
from steercmp.score.sweep import score_rows_fast

FAMILIES = ("edited", "original", "unrelated")
KL = "kl_unsteered"
KL_OFF = "kl_offtarget"
SURVIVAL = "delta_survival"


@attrs.define
class Cell:
    """One row of ``cells.parquet`` before scoring; ``row`` is None for dropped or
    not-applicable cells, ``baseline`` marks rows that are the unsteered model."""

    prompt_id: str
    method: str
    condition: str
    alpha: float
    scaling: str
    status: str
    position: int
    inject_pos: int
    score_pos: int
    delta_norm: float
    meta: dict[str, Any]
    row: ScoreRow | None = None
    baseline: bool = False


@attrs.frozen
class Condition:
    """One condition of a prompt's cells: its name, the proposal it injects (None when nothing is
    scored) and the status its cells carry."""

    name: str
    proposal: Proposal | None
    status: str


def method_cells(sweep: SweepSettings, key: str, method: Method, controls: Mapping[str, Control],
                 contexts: Sequence[PromptContext], proposals: Sequence[Proposal], tokenizer: Any,
                 forms_cache: dict[str, FamilyForms]) -> list[Cell]:
    """All cells of one method: target, unrelated and every control, for each scaling and alpha."""
    by_key = {(p.prompt_id, p.family): p for p in proposals}
    cells: list[Cell] = []
    for ctx in contexts:
        pid = ctx.prompt.id
        target = by_key[(pid, "edited")]
        unrelated = by_key[(pid, "unrelated")]
        conditions = [Condition(TARGET_CONDITION, target, target.status),
                      Condition(UNRELATED_CONDITION, unrelated, unrelated.status)]
        for cname, control in controls.items():
            if target.status == "dropped":
                conditions.append(Condition(cname, None, "dropped"))
            elif not control.applies_to(method):
                conditions.append(Condition(cname, None, "not_applicable"))
            elif control.companion is not None and (
                    (pid, control.companion) not in by_key or by_key[(pid, control.companion)].status == "dropped"):
                # the method proposed no companion here (e.g. no paraphrase rule applied): visible, unscored
                conditions.append(Condition(cname, None, "dropped"))
            else:
                source = target if control.companion is None else by_key[(pid, control.companion)]
                derived = control.derive(source, ctx, make_generator(sweep.seed, key, pid, cname))
                if derived.delta is not None and not torch.isfinite(derived.delta).all():
                    raise NumericalError(f"control {cname!r} derived a NaN or inf delta from method "
                                         f"{key!r}'s proposal for {pid!r}", fix="check the method's delta norms")
                if derived.status == "dropped" or (derived.delta is None and derived.prompt_text is None):
                    conditions.append(Condition(cname, None, "dropped"))  # the control declined: visible, unscored
                else:
                    conditions.append(Condition(cname, derived, target.status))
        for cond in conditions:
            text = cond.proposal.prompt_text if cond.proposal is not None and cond.status != "dropped" else None
            # a prompting text is tokenized once, not once per cell
            tok = None if text is None else tokenize_prompt(tokenizer, ctx.prompt, sweep.chat_template, text=text)
            for scaling in sweep.scalings:
                for alpha in sweep.alphas:
                    if cond.proposal is None or cond.status == "dropped":
                        cells.append(Cell(pid, key, cond.name, alpha, scaling, cond.status, ctx.inject_pos,
                                          ctx.inject_pos, ctx.score_pos, 0.0, {}))
                        continue
                    if pid not in forms_cache:
                        forms_cache[pid] = family_forms(tokenizer, ctx.prompt.families)
                    cells.append(_cell(ctx, key, cond, alpha, scaling, forms_cache[pid], tok))
    return cells


def _cell(ctx: PromptContext, method: str, condition: Condition, alpha: float, scaling: str, forms: FamilyForms,
          tok: TokenizedPrompt | None) -> Cell:
    """One cell; ``tok``: the condition's own text tokenized (a prompting baseline), else None."""
    prop, cond, status = condition.proposal, condition.name, condition.status
    assert prop is not None
    meta = dict(prop.meta)
    if prop.prompt_text is not None:  # a prompting baseline: its own text, nothing injected
        assert tok is not None
        row = ScoreRow(tok.ids, tok.score_pos, forms, torch.zeros(ctx.d_model), 0.0, tok.inject_pos, "raw",
                       kl_context=tuple(ctx.input_ids[: ctx.score_pos + 1]))
        meta["alpha_applies"] = False
        return Cell(ctx.prompt.id, method, cond, alpha, scaling, status, tok.inject_pos, tok.inject_pos,
                    tok.score_pos, 0.0, meta, row, baseline=cond == "noop")
    assert prop.delta is not None
    pos = prop.position if prop.position is not None else ctx.inject_pos
    norm = prop.delta_norm
    if prop.fixed_alpha is not None:  # one operation, not a dose: the same raw injection in every alpha cell
        meta["alpha_applies"] = False
        meta["fixed_alpha"] = prop.fixed_alpha
        row = ScoreRow(ctx.input_ids, ctx.score_pos, forms, prop.delta.float(), float(prop.fixed_alpha), pos, "raw")
        return Cell(ctx.prompt.id, method, cond, alpha, scaling, status, pos, ctx.inject_pos, ctx.score_pos,
                    norm, meta, row, baseline=prop.fixed_alpha == 0.0 or norm == 0.0)
    row = ScoreRow(ctx.input_ids, ctx.score_pos, forms, prop.delta.float(), alpha, pos, scaling)
    return Cell(ctx.prompt.id, method, cond, alpha, scaling, status, pos, ctx.inject_pos, ctx.score_pos,
                norm, meta, row, baseline=alpha == 0.0 or norm == 0.0)


class CellBook:
    """The cells of a run grouped by (method, prompt), built only when a unit must be computed
    (building needs the tokenizer, so the base model): a fully reused run never loads a model.

    ``build_method`` builds one method's cells; a method whose cells cannot be built is passed to
    ``on_error`` and left out."""

    def __init__(self, methods: Sequence[str], build_method: Callable[[str, dict[str, FamilyForms]], list[Cell]],
                 on_error: Callable[[str, BaseException], None]):
        self._methods = list(methods)
        self._build_method = build_method
        self._on_error = on_error
        self._groups: dict[tuple[str, str], list[Cell]] | None = None

    @property
    def methods(self) -> list[str]:
        return list(self._methods)

    def build(self) -> None:
        if self._groups is not None:
            return
        groups: dict[tuple[str, str], list[Cell]] = {}
        forms: dict[str, FamilyForms] = {}
        for key in list(self._methods):
            try:
                built = self._build_method(key, forms)
            except Exception as exc:
                self._on_error(key, exc)
                self._methods.remove(key)
                continue
            for c in built:
                groups.setdefault((c.method, c.prompt_id), []).append(c)
        self._groups = groups

    def cells(self, method: str, prompt_id: str) -> list[Cell]:
        self.build()
        assert self._groups is not None
        return self._groups.get((method, prompt_id), [])


def score_unit(lm: LoadedModel, layer: int, cells: Sequence[Cell], batch_size: int | str) -> list[dict[str, Any]]:
    """Score one unit's cells into ``cells.parquet`` records. Identical unsteered rows score once;
    a row whose logits overflow becomes ``status=error`` with no score."""
    unique: dict[Any, int] = {}
    rows: list[ScoreRow] = []
    index: list[int | None] = []
    for c in cells:
        if c.row is None:
            index.append(None)
            continue
        r = c.row
        ukey = (r.input_ids, r.score_pos) if c.baseline else id(c)
        if ukey not in unique:
            unique[ukey] = len(rows)
            rows.append(r if not c.baseline else attrs.evolve(r, alpha=0.0))
        index.append(unique[ukey])
    try:
        masses = score_rows_fast(lm, layer, rows, batch_size=batch_size, kl=True) if rows else {}
    except NumericalError:
        # some row overflowed: score row by row so only the rows at fault become errors
        masses = {f: torch.full((len(rows),), float("nan"), dtype=torch.float64)
                  for f in (*FAMILIES, KL, KL_OFF, SURVIVAL)}
        for j, r in enumerate(rows):
            try:
                one = score_rows_fast(lm, layer, [r], batch_size=1, kl=True)
            except NumericalError:
                continue
            for f in masses:
                masses[f][j] = one[f][0]
    records = []
    for c, i in zip(cells, index, strict=True):
        vals = {f: (float(masses[f][i]) if i is not None else None) for f in FAMILIES}
        kl = float(masses[KL][i]) if i is not None else None
        kl_off = float(masses[KL_OFF][i]) if i is not None else None
        survival = float(masses[SURVIVAL][i]) if i is not None else None
        status, meta = c.status, dict(c.meta)
        if i is not None and not all(math.isfinite(v) for v in vals.values()):  # type: ignore[arg-type]
            status, meta["error"] = "error", "NaN or inf logits"
            vals, kl, kl_off = {f: None for f in vals}, None, None
        score = None if vals["edited"] is None else vals["edited"] - vals["original"]  # type: ignore[operator]
        records.append({
            "prompt_id": c.prompt_id, "method": c.method, "condition": c.condition, "alpha": c.alpha,
            "scaling": c.scaling, "position": c.position, "inject_pos": c.inject_pos,
            "score_pos": c.score_pos, "delta_norm": c.delta_norm,
            "logmass_edited": vals["edited"], "logmass_original": vals["original"],
            "logmass_unrelated": vals["unrelated"], "score": score,
            "kl_unsteered": None if kl is None or not math.isfinite(kl) else kl,
            "kl_offtarget": None if kl_off is None or not math.isfinite(kl_off) else kl_off,
            "delta_survival": None if survival is None or not math.isfinite(survival) else survival, "status": status,
            "meta": json.dumps(meta, sort_keys=True, default=str),
        })
    return records
