"""Layer 2 of the report: chart builders. Each takes an aggregated polars frame from
:mod:`steercmp.report.transforms` and returns an ``alt.Chart`` (or a layered/faceted chart).
No statistics are computed here."""

from __future__ import annotations

import altair as alt
import polars as pl

CONDITION_ORDER = ["target_edit", "noop", "unrelated_edit", "random_delta", "wrong_position"]
CONDITION_COLORS = ["#d62728", "#7f7f7f", "#1f77b4", "#ff7f0e", "#9467bd"]
FAMILY_ORDER = ["original", "edited", "unrelated"]


def _conditions(df: pl.DataFrame, col: str = "condition") -> tuple[list[str], list[str]]:
    present = df[col].unique().to_list() if col in df.columns else []
    order = [c for c in CONDITION_ORDER if c in present] + sorted(
        c for c in present if c not in CONDITION_ORDER)
    extra = ["#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    colors = [CONDITION_COLORS[CONDITION_ORDER.index(c)] if c in CONDITION_ORDER
              else extra[i % len(extra)] for i, c in enumerate(order)]
    return order, colors


def dose_response_chart(df: pl.DataFrame) -> alt.FacetChart:
    """Mean paired effect vs noop against alpha per condition with 95% CI bands, one facet per
    method · scaling (noop itself is the zero line)."""
    order, colors = _conditions(df)
    color = alt.Color("condition:N", scale=alt.Scale(domain=order, range=colors),
                      sort=order, title="condition", legend=alt.Legend(orient="top"))
    base = alt.Chart().encode(x=alt.X("alpha:Q", title="alpha"), color=color)
    band = base.mark_area(opacity=0.15).encode(
        y=alt.Y("ci_low:Q", title="score − noop score (paired)"), y2="ci_high:Q")
    line = base.mark_line(point=True).encode(
        y="mean:Q",
        tooltip=["condition", "alpha", alt.Tooltip("mean:Q", format="+.3f"), "n",
                 alt.Tooltip("ci_low:Q", format="+.3f"), alt.Tooltip("ci_high:Q", format="+.3f")])
    zero = alt.Chart().mark_rule(strokeDash=[4, 4], color="black").encode(y=alt.datum(0))
    return alt.layer(band, line, zero, data=df).properties(width=250, height=200).facet(
        facet=alt.Facet("panel:N", title=None), columns=3
    ).resolve_scale(y="independent").properties(
        title="Dose-response relative to noop: mean paired effect with 95% bootstrap CI (own y scale per method)")


def heatmap_chart(df: pl.DataFrame) -> alt.VConcatChart:
    """Per-prompt effect vs noop, prompt (with selection status) x condition: one row of alpha
    facets per method · scaling, stacked (each panel keeps its own prompt labels)."""
    order, _ = _conditions(df)
    lim = float(df["effect"].abs().max() or 1.0) if df.height else 1.0
    color = alt.Color("effect:Q", scale=alt.Scale(scheme="redblue", domain=[-lim, lim],
                                                  reverse=True), title="− noop")
    rows = []
    for panel in sorted(df["panel"].unique().to_list()):
        part = df.filter(pl.col("panel") == panel)
        base = alt.Chart().encode(
            x=alt.X("condition:N", sort=order, title=None,
                    axis=alt.Axis(orient="top", labelAngle=-30)),
            y=alt.Y("prompt:N", title=None),
        )
        # grey background cell for every row, so dropped prompts (null score) stay visible
        missing = base.mark_rect(color="#e6e6e6").encode(
            tooltip=["prompt_id", "selection", "condition"])
        rect = base.mark_rect().encode(
            color=color,
            tooltip=["prompt_id", "selection", "condition", "alpha",
                     alt.Tooltip("effect:Q", format="+.3f")])
        text = base.mark_text(fontSize=9).encode(
            text=alt.Text("effect:Q", format="+.2f")).transform_filter("isValid(datum.effect)")
        rows.append(alt.layer(missing, rect, text, data=part).properties(width=220).facet(
            column=alt.Column("alpha_label:N", title=None),
        ).properties(title=panel))
    return alt.vconcat(*rows).properties(
        title="Per-prompt effect vs noop at the decision alphas (prompt [selection])")


def forest_chart(df: pl.DataFrame) -> alt.FacetChart:
    """Paired effect (target − control) with 95% CI per control and alpha; red = wins."""
    base = alt.Chart().encode(y=alt.Y("row:N", title=None, sort=None))
    bars = base.mark_rule(strokeWidth=2).encode(
        x=alt.X("ci_low:Q", title="target − control (mean, 95% CI)"), x2="ci_high:Q",
        color=alt.Color("wins:N", scale=alt.Scale(domain=[True, False],
                                                  range=["#d62728", "#7f7f7f"]),
                        title="beats control", legend=alt.Legend(orient="top")))
    points = base.mark_point(filled=True, size=60).encode(
        x="mean_diff:Q",
        color=alt.Color("wins:N", scale=alt.Scale(domain=[True, False],
                                                  range=["#d62728", "#7f7f7f"])),
        tooltip=["control", "alpha", "n", alt.Tooltip("mean_diff:Q", format="+.3f"),
                 alt.Tooltip("ci_low:Q", format="+.3f"), alt.Tooltip("ci_high:Q", format="+.3f"),
                 alt.Tooltip("p_value:Q", format=".4f"), alt.Tooltip("min_p:Q", format=".4f")])
    zero = alt.Chart().mark_rule(strokeDash=[4, 4], color="black").encode(x=alt.datum(0))
    return alt.layer(bars, points, zero, data=df).properties(width=260).facet(
        column=alt.Column("metric:N", title=None), row=alt.Row("panel:N", title=None)
    ).resolve_scale(x="independent").properties(
        title="Paired effects vs each control (one-sided exact sign-flip test, intersection-union rule)")


def hit_rate_chart(df: pl.DataFrame) -> alt.FacetChart:
    """Completion hit rate per condition and family with 95% CIs (seeds averaged per prompt)."""
    order, _ = _conditions(df)
    color = alt.Color("family:N", sort=FAMILY_ORDER,
                      scale=alt.Scale(domain=FAMILY_ORDER, range=["#1f77b4", "#d62728", "#7f7f7f"]),
                      legend=alt.Legend(orient="top"))
    base = alt.Chart().encode(x=alt.X("condition:N", sort=order, title=None),
                              xOffset=alt.XOffset("family:N", sort=FAMILY_ORDER), color=color)
    bars = base.mark_bar(opacity=0.7).encode(
        y=alt.Y("rate:Q", title="hit rate", scale=alt.Scale(domain=[0, 1])),
        tooltip=["condition", "family", "alpha", "n_prompts", "n_completions",
                 alt.Tooltip("rate:Q", format=".3f"), alt.Tooltip("ci_low:Q", format=".3f"),
                 alt.Tooltip("ci_high:Q", format=".3f")])
    err = base.mark_rule(color="black").encode(y="ci_low:Q", y2="ci_high:Q")
    return alt.layer(bars, err, data=df).properties(width=260, height=180).facet(
        column=alt.Column("alpha_label:N", title=None), row=alt.Row("panel:N", title=None)
    ).properties(title="Completion hit rates with 95% bootstrap CI over prompts")


def matched_norm_chart(df: pl.DataFrame) -> alt.Chart:
    """Target-edit effect vs noop against injected norm (delta_norm × |alpha|) per method, with 95% CI."""
    base = alt.Chart(df).encode(
        x=alt.X("injected_norm:Q", title="injected norm  ‖δ‖·|α|"),
        color=alt.Color("method:N", title="method"))
    line = base.mark_line(point=True).encode(
        y=alt.Y("mean:Q", title="target_edit − noop score"),
        detail="scaling:N",
        tooltip=["method", "scaling", "alpha", "n", alt.Tooltip("injected_norm:Q", format=".3f"),
                 alt.Tooltip("mean:Q", format="+.3f")])
    err = base.mark_rule().encode(y="ci_low:Q", y2="ci_high:Q")
    return alt.layer(err, line).properties(
        width=420, height=260, title="Target effect against injected norm (methods at matched ‖δ‖)")
