"""The locator's outputs: per-site means over prompts, the best sites, and the heatmap.

Three layers as in the report: a polars summary (:func:`site_summary`), an Altair heatmap
(:func:`heatmap`), and the writer (:func:`write_locate`) that saves parquet, PNG and a
self-contained HTML page.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import altair as alt
import numpy as np
import polars as pl

from steercmp.report.pages import VL_VERSION, js_bundle, save_png
from steercmp.stats import bootstrap_mean_ci

KEYS = ["family", "construction", "layer", "label"]


def site_summary(records: pl.DataFrame, *, n_boot: int = 2_000, seed: int = 0) -> pl.DataFrame:
    """Per (family, construction, layer, position label): n prompts, mean shift with a 95%
    bootstrap CI over prompts, prompts with a positive shift, the mean ceiling and the mean
    share of the ceiling the site recovers."""
    rows = []
    for key, grp in records.group_by(KEYS, maintain_order=True):
        shift = grp["shift"].to_numpy()
        lo, hi = bootstrap_mean_ci(shift, n_boot=n_boot, seed=seed)
        ceiling = grp["ceiling"].to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(np.abs(ceiling) > 1e-9, shift / ceiling, np.nan)
        order = 10_000 if key[-1] == "slot" else int(grp["offset"].min())
        rows.append(dict(zip(KEYS, key, strict=True), order=order, n=len(shift), mean_shift=float(shift.mean()), ci_low=lo,
                         ci_high=hi, n_positive=int((shift > 0).sum()), mean_ceiling=float(ceiling.mean()),
                         mean_recovery=float(np.nanmean(frac)) if np.isfinite(frac).any() else None))
    return pl.DataFrame(rows).sort("family", "construction", "layer", "order")


def best_sites(summary: pl.DataFrame, top: int = 10) -> pl.DataFrame:
    """The ``top`` sites per (family, construction) by mean shift."""
    return (summary.sort("mean_shift", descending=True).group_by("family", "construction", maintain_order=True)
            .head(top).sort("family", "construction", "mean_shift", descending=[False, False, True]))


def heatmap(summary: pl.DataFrame) -> alt.FacetChart:
    """Mean shift per layer (rows) and position (columns, line-end word to the rhyme slot)."""
    df = summary.with_columns(pl.concat_str([pl.col("family"), pl.lit(" · "), pl.col("construction")]).alias("panel"))
    order = df.select("label", "order").unique().sort("order")["label"].unique(maintain_order=True).to_list()
    lim = float(df["mean_shift"].abs().max() or 1.0)
    base = alt.Chart(df).encode(x=alt.X("label:N", sort=order, title="position (offset from the line break)"),
                                y=alt.Y("layer:O", sort="descending", title="layer (output of block)"))
    rect = base.mark_rect().encode(
        color=alt.Color("mean_shift:Q", scale=alt.Scale(scheme="redblue", domain=[-lim, lim], reverse=True),
                        title="mean shift"),
        tooltip=["panel", "layer", "label", "n", alt.Tooltip("mean_shift:Q", format="+.3f"),
                 alt.Tooltip("ci_low:Q", format="+.3f"), alt.Tooltip("ci_high:Q", format="+.3f"), "n_positive",
                 alt.Tooltip("mean_ceiling:Q", format="+.3f")])
    return rect.properties(width=420, height=260).facet(facet=alt.Facet("panel:N", title=None), columns=2).properties(
        title="Patching the counterfactual's residual: shift of target − original log-mass at the rhyme slot")


def standalone_html(title: str, chart: alt.TopLevelMixin, tables: list[tuple[str, pl.DataFrame]]) -> str:
    """One self-contained page (Vega inlined) with the chart and its tables."""
    e = html.escape
    parts = [f"<h1>{e(title)}</h1>", "<div id='chart'></div>"]
    for sub, df in tables:
        head = "".join(f"<th>{e(c)}</th>" for c in df.columns)
        body = "".join("<tr>" + "".join(f"<td>{e(f'{v:+.3f}' if isinstance(v, float) else str(v))}</td>" for v in row)
                       + "</tr>" for row in df.iter_rows())
        parts.append(f"<h2>{e(sub)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    spec = chart.to_json(indent=None).replace("</", "<" + chr(92) + "/")
    js = js_bundle().replace("</script", "<" + chr(92) + "/script")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>" + e(title) + "</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px}table{border-collapse:collapse;"
            "font-size:0.85em}td,th{border:1px solid #ddd;padding:2px 6px}</style>"
            f"<script>{js}</script></head><body>" + "".join(parts)
            + f"<script>vegaEmbed('#chart', {spec}, {{renderer: 'svg', actions: false}});</script></body></html>\n")


def write_locate(out: Path, records: pl.DataFrame, meta: dict, *, top: int = 10, seed: int = 0) -> pl.DataFrame:
    """Write locate.parquet, locate_summary.parquet, locate.json, heatmap.png and locate.html;
    return the best sites."""
    summary = site_summary(records, seed=seed)
    best = best_sites(summary, top)
    records.write_parquet(out / "locate.parquet")
    summary.write_parquet(out / "locate_summary.parquet")
    (out / "locate.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    chart = heatmap(summary)
    save_png(chart, out / "heatmap.png")
    (out / "locate.html").write_text(standalone_html(f"steercmp locate: {meta.get('experiment', '')}", chart,
                                                     [("best sites", best)]))
    return best


__all__ = ["best_sites", "heatmap", "site_summary", "standalone_html", "write_locate", "VL_VERSION"]
