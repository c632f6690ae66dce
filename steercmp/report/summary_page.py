"""The report's first screen: the matched-dose verdicts (one table) and what they say about the site.

``summary.md`` is this page alone (at most :data:`MAX_LINES` lines): the site banner, the
decision in one paragraph, one verdict table (dose, score and its two parts at matched KL with
CIs, off-target KL, n intention-to-treat / selected, verdict, the check that decided it) and
links. Everything else (per-alpha tables, per-control tables, the NLA panel) is in
``details.md`` and in the collapsed sections of ``report.html``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import polars as pl

from steercmp.report.text_tables import fmt, fmt_ci
from steercmp.stats.analysis import injects, matched_banner

MAX_LINES = 60
Table = tuple[list[str], list[list[str]]]
def label(v: Mapping[str, Any]) -> str:
    name = v["method"]
    if v.get("role") == "positive_control":
        name += " (positive control)"
    if v.get("oracle_assisted"):
        name += " (oracle-assisted)"
    return name


def _part(v: Mapping[str, Any], key: str) -> str:
    s = (v.get("itt") or {}).get(key) or {}
    return f"{fmt(s.get('mean'))} {fmt_ci(s.get('ci_low'), s.get('ci_high'))}" if s.get("mean") is not None else "NA"


def verdict_table(verdicts: Sequence[Mapping[str, Any]]) -> Table:
    head = ["method", "dose (‖δ‖ / ‖h‖)", "score vs noop [95% CI]", "Δ log P(edited)", "Δ log P(original)",
            "off-target KL (budget)", "share of PC", "n ITT / selected", "verdict", "decided by"]
    rows = []
    pc = next((v for v in verdicts if v.get("role") == "positive_control"), None)
    pc_mean = ((pc or {}).get("itt") or {}).get("score_vs_noop", {}).get("mean") if pc else None
    for v in verdicts:
        mean = ((v.get("itt") or {}).get("score_vs_noop") or {}).get("mean")
        share = (f"{mean / pc_mean:.0%}" if pc_mean and mean is not None and pc_mean > 0 and v is not pc
                 and injects(v) else "")
        dose = ("prompt (no dose)" if not injects(v) else
                f"{fmt(v.get('ratio_median'), '.3g')}" + ("" if v.get("dose_matched") else " not matched"))
        kl = f"{fmt(v.get('kl_offtarget_median'), '.3g')} ({fmt(v.get('budget_median'), '.3g')})"
        rows.append([label(v), dose, _part(v, "score_vs_noop"), _part(v, "d_edited"), _part(v, "d_original"), kl,
                     share, f"{v.get('n_itt', 0)} / {v.get('n_selected', 0)}", v["verdict"], v.get("decided_by", "")])
    return head, rows


def _md(table: Table) -> list[str]:
    head, rows = table
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def decision_paragraph(decision: Mapping[str, Any], preregistered: bool) -> str:
    budget = ("the positive control's own off-target KL on each prompt (a patch, alpha 1)"
              if decision.get("max_kl", "auto") == "auto" else f"{decision['max_kl']} nats of off-target KL")
    text = (f"Every method, the random controls ({decision.get('random_draws')} draws per prompt) and the text-edit "
            f"controls are dose-matched per prompt to {budget}. A check passes when the one-sided sign-flip "
            f"p < {decision.get('level')} and the 95% CI lies above 0, reads 'no effect' when the CI and the "
            f"equivalence test put it below min_effect = {decision.get('min_effect')} nats, else 'inconclusive'. "
            f"Intention-to-treat: a prompt a method drops or gates counts as no-op.")
    if not preregistered:
        text = "**Exploratory re-analysis: the decision settings differ from the pre-declared ones.** " + text
    return text


def survival_warning(cells: pl.DataFrame, threshold: float = 0.99) -> str | None:
    """One line when injected cells lost more than 1% of their delta to the cast to the model's
    dtype (``delta_survival`` below ``threshold``), else ``None``."""
    if "delta_survival" not in cells.columns:
        return None
    lost = cells.filter(pl.col("delta_survival").is_not_null() & (pl.col("delta_survival") < threshold))
    if lost.is_empty():
        return None
    return (f"{lost.height} of {cells.height} cells kept less than {threshold:.0%} of their injected delta after the "
            f"cast to the model's dtype (lowest {lost['delta_survival'].min():.3f}, e.g. {lost['method'][0]} on "
            f"{lost['prompt_id'][0]}): compare them in float32, or use larger deltas.")


def summary_markdown(title: str, verdicts: Sequence[Mapping[str, Any]], decision: Mapping[str, Any],
                     preregistered: bool, warnings: Sequence[str] = ()) -> str:
    lines = [f"# steercmp report: {title}", "", f"> **{matched_banner(verdicts)}**", "",
             *[f"> {w}" if w.startswith("PARTIAL") else f"> Warning: {w}" for w in warnings], *([""] if warnings else []),
             "## Verdicts at matched side effects", "", decision_paragraph(decision, preregistered), "",
             *_md(verdict_table(verdicts)), ""]
    why = [f"- {v['method']}: {v['explanation']}" for v in verdicts]
    room = MAX_LINES - len(lines) - 4
    lines += why[:room] if len(why) <= room else [*why[:room - 1], "- ... (verdict.json has every check)"]
    lines += ["", "More: `details.md` (per-alpha and per-control tables), `report.html` (charts), `verdict.json` "
              "(every check, power, settings)."]
    return "\n".join(lines) + "\n"


def pareto_frame(cells: pl.DataFrame, verdicts: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """Score vs off-target KL along each method's alpha sweep (per-alpha means over prompts,
    target minus no-op), one row per method and alpha."""
    if "kl_offtarget" not in cells.columns:
        return pl.DataFrame()
    keep = [v["method"] for v in verdicts if injects(v)]
    ok = cells.filter(pl.col("score").is_not_null() & pl.col("method").is_in(keep)
                      & pl.col("status").is_in(["ok", "editable"]))
    noop = ok.filter(pl.col("condition") == "noop").select("prompt_id", "method", "alpha", "scaling",
                                                           pl.col("score").alias("noop"))
    t = ok.filter((pl.col("condition") == "target_edit") & (pl.col("alpha") > 0)).join(
        noop, on=["prompt_id", "method", "alpha", "scaling"])
    return (t.group_by("method", "alpha").agg((pl.col("score") - pl.col("noop")).mean().alias("score_vs_noop"),
                                              pl.col("kl_offtarget").median().alias("kl_offtarget"))
            .filter(pl.col("kl_offtarget") > 0).sort("method", "alpha"))


def pareto_chart(frame: pl.DataFrame, verdicts: Sequence[Mapping[str, Any]]) -> alt.LayerChart:
    """Each method's dose curve (score vs off-target KL, log x), its matched point, the budget, and
    the random band at the budget (mean +- between-prompt SD of the K KL-matched random draws)."""
    points = pl.DataFrame([{"method": v["method"], "kl_offtarget": v.get("kl_offtarget_median"),
                            "score_vs_noop": ((v.get("itt") or {}).get("score_vs_noop") or {}).get("mean")}
                           for v in verdicts if injects(v) and v.get("kl_offtarget_median")])
    x = alt.X("kl_offtarget:Q", scale=alt.Scale(type="log"), title="off-target KL (nats, log)")
    y = alt.Y("score_vs_noop:Q", title="score vs noop (nats)")
    curves = alt.Chart(frame.to_pandas()).mark_line(point=True, opacity=0.6).encode(
        x=x, y=y, color="method:N", tooltip=["method", "alpha", "kl_offtarget", "score_vs_noop"])
    layers: list[Any] = [curves]
    if not points.is_empty():
        layers.append(alt.Chart(points.to_pandas()).mark_point(shape="diamond", size=140, filled=True).encode(
            x=x, y=y, color="method:N", tooltip=["method", "kl_offtarget", "score_vs_noop"]))
    spread = next(((v.get("random_spread") or {}).get("random_delta") for v in verdicts
                   if (v.get("random_spread") or {}).get("random_delta")), None)
    budgets = [v.get("budget_median") for v in verdicts if v.get("budget_median")]
    if spread and budgets and spread.get("mean_effect") is not None and spread.get("between_prompt_sd") is not None:
        m, sd = spread["mean_effect"], spread["between_prompt_sd"]
        band = pl.DataFrame({"kl_offtarget": [budgets[0]], "low": [m - sd], "high": [m + sd], "mean": [m]})
        layers.append(alt.Chart(band.to_pandas()).mark_errorbar(color="gray", thickness=3).encode(
            x=x, y=alt.Y("low:Q", title="score vs noop (nats)"), y2="high:Q"))
        layers.append(alt.Chart(band.to_pandas()).mark_tick(color="gray", thickness=2).encode(x=x, y="mean:Q"))
    if budgets:
        layers.append(alt.Chart(pl.DataFrame({"budget": [budgets[0]]}).to_pandas()).mark_rule(
            strokeDash=[4, 4], color="gray").encode(x="budget:Q"))
    return alt.layer(*layers).properties(width=560, height=320,
                                         title="Dose curves (alpha sweep) and the matched points (diamonds)")
