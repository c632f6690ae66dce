"""The NLA report section: reconstruction fidelity and selection status per prompt.

Registered through ``register_report_sections``; reads the ``selections`` table the method
writes (``methods/<method>/selections.parquet``).
"""

from __future__ import annotations

import altair as alt
import polars as pl

from steercmp.api import ReportInputs, ReportSection, SectionContent

SELECTION_ORDER = ["editable", "fallback", "dropped"]
COLUMNS = ("method", "prompt_id", "selection", "sample", "cosine", "fve_nrm", "mse_nrm", "delta_norm",
           "unrelated_delta_norm")


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
                                                       range=["#2ca02c", "#ff7f0e", "#7f7f7f"]),
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
