"""The NLA report sections: reconstruction fidelity per prompt, and the panel that says whether
a text edit is semantic.

Registered through ``register_report_sections``. The fidelity section reads the ``selections``
table the method writes (``methods/<method>/selections.parquet``); the panel reads the cells of
every text-edit method (a method with ``paraphrase_edit`` or ``round_trip`` rows): per prompt,
fve_nrm against the target edit's effect, the paraphrase's effect against the target's, and how
far the round trip moves the score and the whole next-token distribution (KL) from the unsteered run.
"""

from __future__ import annotations

import json

import altair as alt
import polars as pl

from steercmp.api import ReportInputs, ReportSection, SectionContent

SELECTION_ORDER = ["editable", "fallback", "below_fidelity", "dropped"]
COLUMNS = ("method", "prompt_id", "selection", "sample", "cosine", "fve_nrm", "mse_nrm", "delta_norm",
           "unrelated_delta_norm")
TEXT_EDIT_CONDITIONS = ("paraphrase_edit", "round_trip")
LIVE = ("ok", "editable", "fallback", "below_fidelity")


def selections_frame(tables: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
    """Every NLA method's selections, with a ``method`` column."""
    frames = [df.with_columns(pl.lit(m).alias("method")) for m, df in tables.items()
              if {"selection", "prompt_id"} <= set(df.columns)]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def fidelity_frame(selections: pl.DataFrame) -> pl.DataFrame:
    """Long form: prompt, selection status, metric (cosine, fve_nrm, delta_norm) and value."""
    metrics = [c for c in ("cosine", "fve_nrm", "delta_norm") if c in selections.columns]
    base = selections.select("prompt_id", pl.col("selection").cast(pl.String), *metrics)
    return base.unpivot(index=["prompt_id", "selection"], on=metrics, variable_name="metric",
                        value_name="value").with_columns(pl.col("value").cast(pl.Float64)).sort("metric", "prompt_id")


def fidelity_chart(df: pl.DataFrame) -> alt.FacetChart:
    """NLA fidelity (cosine, FVE, delta norm) per prompt, coloured by selection status."""
    return alt.Chart(df).mark_bar().encode(
        y=alt.Y("prompt_id:N", title=None),
        x=alt.X("value:Q", title=None),
        color=alt.Color("selection:N", scale=alt.Scale(domain=SELECTION_ORDER,
                                                       range=["#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f"]),
                        title="selection", legend=alt.Legend(orient="top")),
        tooltip=["prompt_id", "selection", "metric", alt.Tooltip("value:Q", format=".4f")],
    ).properties(width=200).facet(column=alt.Column("metric:N", title=None)).resolve_scale(
        x="independent").properties(title="NLA reconstruction fidelity and selection per prompt")


def build_section(inputs: ReportInputs) -> SectionContent | None:
    selections = selections_frame(dict(inputs.method_tables("selections")))
    if selections is None or selections.is_empty():
        return None
    cols = [c for c in COLUMNS if c in selections.columns]
    return SectionContent(chart=fidelity_chart(fidelity_frame(selections)),
                          tables=[("selections", selections.select(cols).sort(cols[:2]))],
                          note="reconstruction fidelity of the selected explanation per prompt "
                               "(fve_nrm against the dataset-level baseline) and its selection status.")


SECTION = ReportSection(name="nla_fidelity", title="NLA fidelity and selection status", build=build_section,
                        missing="no NLA method wrote methods/*/selections.parquet")


def panel_frame(cells: pl.DataFrame, alpha: float) -> pl.DataFrame:
    """One row per text-edit method, scaling and prompt at ``alpha``: fve_nrm, status, the
    target's and the paraphrase's effects (score minus noop, paired), the round trip's score
    shift and its KL from the unsteered run. Empty when no method has text-edit controls."""
    methods = (cells.filter(pl.col("condition").is_in(TEXT_EDIT_CONDITIONS) & pl.col("status").is_in(LIVE))
               ["method"].unique().to_list())
    if not methods:
        return pl.DataFrame()
    df = cells.filter(pl.col("method").is_in(methods) & ((pl.col("alpha") - alpha).abs() < 1e-9)
                      & pl.col("status").is_in(LIVE))
    kl = "kl_unsteered" if "kl_unsteered" in df.columns else None
    wide = df.pivot(on="condition", index=["method", "scaling", "prompt_id"], values="score",
                    aggregate_function="first")
    status = df.filter(pl.col("condition") == "target_edit").select(
        "method", "scaling", "prompt_id", "status",
        pl.col("meta").map_elements(lambda m: json.loads(m).get("fve_nrm"), return_dtype=pl.Float64).alias("fve_nrm"))
    out = wide.join(status, on=["method", "scaling", "prompt_id"], how="left")
    if kl:
        rt_kl = df.filter(pl.col("condition") == "round_trip").select(
            "method", "scaling", "prompt_id", pl.col(kl).alias("round_trip_kl"))
        out = out.join(rt_kl, on=["method", "scaling", "prompt_id"], how="left")
    else:
        out = out.with_columns(pl.lit(None, dtype=pl.Float64).alias("round_trip_kl"))
    for cond in ("noop", "target_edit", "paraphrase_edit", "round_trip"):
        if cond not in out.columns:
            out = out.with_columns(pl.lit(None, dtype=pl.Float64).alias(cond))
    return out.select(
        "method", "scaling", "prompt_id", "status", "fve_nrm",
        (pl.col("target_edit") - pl.col("noop")).alias("target_effect"),
        (pl.col("paraphrase_edit") - pl.col("noop")).alias("paraphrase_effect"),
        (pl.col("round_trip") - pl.col("noop")).alias("round_trip_shift"),
        "round_trip_kl").sort("method", "scaling", "prompt_id")


def panel_chart(df: pl.DataFrame, alpha: float) -> alt.HConcatChart:
    base = alt.Chart(df).encode(color=alt.Color("status:N", scale=alt.Scale(domain=SELECTION_ORDER[:3]),
                                                legend=alt.Legend(orient="top")),
                                tooltip=["method", "scaling", "prompt_id", "status",
                                         alt.Tooltip("fve_nrm:Q", format=".3f"),
                                         alt.Tooltip("target_effect:Q", format=".3f"),
                                         alt.Tooltip("paraphrase_effect:Q", format=".3f"),
                                         alt.Tooltip("round_trip_shift:Q", format=".3f"),
                                         alt.Tooltip("round_trip_kl:Q", format=".4f")])
    fve = base.mark_circle(size=50).encode(
        x=alt.X("fve_nrm:Q", title="fve_nrm of the selected explanation"),
        y=alt.Y("target_effect:Q", title=f"target effect vs noop (α={alpha:g})")).properties(
        width=220, height=200, title="fidelity vs edit effect")
    para = base.mark_circle(size=50).encode(
        x=alt.X("paraphrase_effect:Q", title="paraphrase effect vs noop"),
        y=alt.Y("target_effect:Q", title="target effect vs noop")).properties(
        width=220, height=200, title="edit vs neutral rewording")
    rt = base.mark_circle(size=50).encode(
        x=alt.X("round_trip_kl:Q", title="round-trip KL from unsteered (nats)"),
        y=alt.Y("round_trip_shift:Q", title="round-trip score shift vs noop")).properties(
        width=220, height=200, title="round trip (α=1, once)")
    return alt.hconcat(fve, para, rt).properties(title="Is the text edit semantic?")


def panel_summary(df: pl.DataFrame) -> pl.DataFrame:
    """Per text-edit method and scaling: mean fidelity and effects, how often the edit beats its
    rewording, and the round trip's typical score shift and KL."""
    beats = (pl.col("target_effect") > pl.col("paraphrase_effect")).cast(pl.Int64)
    both = pl.col("target_effect").is_not_null() & pl.col("paraphrase_effect").is_not_null()
    return df.group_by("method", "scaling", maintain_order=True).agg(
        pl.len().alias("prompts"), pl.col("fve_nrm").mean().alias("mean fve_nrm"),
        pl.col("target_effect").mean().alias("target effect"),
        pl.col("paraphrase_effect").mean().alias("paraphrase effect"),
        (beats.filter(both).sum().cast(pl.String) + "/" + both.sum().cast(pl.String)).alias("target > paraphrase"),
        pl.col("round_trip_shift").mean().alias("round-trip shift (mean)"),
        pl.col("round_trip_shift").abs().median().alias("|round-trip shift| (median)"),
        pl.col("round_trip_kl").median().alias("round-trip KL (median)"))


def build_panel(inputs: ReportInputs) -> SectionContent | None:
    if not inputs.decision_alphas:
        return None
    alpha = inputs.decision_alphas[0]
    df = panel_frame(inputs.cells, alpha)
    if df.is_empty():
        return None
    summary = panel_summary(df)
    return SectionContent(
        chart=panel_chart(df, alpha),
        tables=[("summary (all live prompts, primary and gated/fallback alike)", summary),
                ("per prompt", df)],
        note=(f"Effects are paired differences from noop at α={alpha:g}. A semantic edit beats its neutral "
              "rewording (paraphrase_edit: the same explanation reworded by fixed rules, through the AR). The round "
              "trip replaces the activation once by AR(original explanation) at the activation's norm: a faithful "
              "pair moves the score and the next-token distribution (KL, nats) little. The verdicts above test "
              "target_edit against both controls on primary prompts only."))


PANEL = ReportSection(name="nla_panel", title="NLA: fidelity, paraphrase and round trip", build=build_panel,
                      missing="no text-edit method with paraphrase_edit or round_trip cells in this run")
