"""The report's two pages: ``summary.md`` and a self-contained ``report.html``.

Both render the same :class:`Page` (verdicts, then sections with their charts and tables, then
provenance); nothing here computes a statistic.
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import attrs
import vl_convert as vlc

from steercmp import stats
from steercmp.report.sections import Section
from steercmp.report.text_tables import Table

NOT_AVAILABLE = "not available"
VL_VERSION = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])


@attrs.frozen
class ChartSpec:
    """A chart of the report: its title and the Altair chart, or why it is missing."""

    title: str
    chart: Any = None
    missing: str = ""


@attrs.frozen
class Page:
    title: str
    header: str
    verdicts: Sequence[Mapping[str, Any]]
    sections: Sequence[Section]
    charts: Mapping[str, ChartSpec]
    manifest: Mapping[str, Any] | None
    banner: str = ""  # the first thing a reader sees: can anything tested steer this site?
    #: the matched-dose verdict: (banner, decision paragraph, verdict table), shown first in the HTML
    matched: tuple[str, str, tuple[list[str], list[list[str]]]] | None = None


@functools.lru_cache(maxsize=1)
def js_bundle() -> str:
    return vlc.javascript_bundle(vl_version=VL_VERSION)


def save_png(chart: alt.TopLevelMixin, path: Any) -> None:
    path.write_bytes(vlc.vegalite_to_png(chart.to_json(), vl_version=VL_VERSION, scale=2))


def failure_lines(v: Mapping[str, Any], limit: int = 12) -> list[str]:
    lines = [f"{c['metric']} α={c['alpha']:g} vs {c['control']}: {c['reason']}" for c in v["failures"]]
    if len(lines) > limit:
        lines = lines[:limit] + [f"… and {len(lines) - limit} more (see verdict.json)"]
    return lines


def _md_table(table: Table) -> str:
    head, rows = table
    if not rows:
        return f"_{NOT_AVAILABLE}_\n"
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _html_table(table: Table) -> str:
    head, rows = table
    if not rows:
        return f"<p class='na'>{NOT_AVAILABLE}</p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _empty(section: Section, charts: Mapping[str, ChartSpec]) -> bool:
    return not section.tables and (section.chart is None or charts[section.chart].chart is None)


def markdown(page: Page) -> str:
    lines = [f"# steercmp report: {page.title}", ""]
    if page.banner:
        lines += [f"> **{page.banner}**", ""]
    lines += ["## Verdicts", "", page.header, ""]
    for v in page.verdicts:
        role = " (positive control)" if v.get("role") == stats.POSITIVE_CONTROL else ""
        lines.append(f"- **{v['method']} · {v['scaling']}{role}: {v['verdict']}** — {v['explanation']}")
        lines += [f"  - {line}" for line in failure_lines(v)]
    lines.append("")
    for sec in page.sections:
        lines += [f"## {sec.heading}", ""]
        if sec.note:
            lines += [sec.note, ""]
        if sec.chart is not None:
            spec = page.charts[sec.chart]
            lines += [f"Chart: `{sec.chart}.png`" if spec.chart is not None
                      else f"Chart: {NOT_AVAILABLE} ({spec.missing}).", ""]
        if _empty(sec, page.charts):
            lines += [f"_{NOT_AVAILABLE}_", ""]
        for sub, table in sec.tables:
            lines += [f"### {sub}", "", _md_table(table)]
    lines += ["## Provenance", ""]
    lines += (["```json", json.dumps(page.manifest, indent=2, default=str), "```"] if page.manifest
              else [f"_{NOT_AVAILABLE}_ (no manifest.json)"])
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:0.2em} h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:2em}
table{border-collapse:collapse;margin:0.5em 0 1em;font-size:0.85em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left}
.verdict{border-left:6px solid #999;padding:0.5em 1em;margin:0.6em 0;background:#fafafa}
.v-supported{border-color:#2ca02c}.v-shift{border-color:#ff7f0e}.v-not{border-color:#d62728}
.v-under{border-color:#9467bd}
.na{color:#888;font-style:italic} .meta{color:#666;font-size:0.9em}
.chart{margin:1em 0;overflow-x:auto} pre{background:#f5f5f5;padding:0.8em;overflow-x:auto;font-size:0.8em}
details{margin:0.3em 0}
.banner{font-weight:bold;border:2px solid #444;padding:0.6em 1em;background:#fffbe6}
"""


def _verdict_class(v: str) -> str:
    return {stats.SUPPORTED: "v-supported", stats.SHIFT_ONLY: "v-shift",
            stats.UNDERPOWERED: "v-under"}.get(v, "v-not")


def html_page(page: Page) -> str:
    e = html.escape
    body = [f"<h1>steercmp report: {e(page.title)}</h1>"]
    if page.matched is not None:
        m_banner, paragraph, table = page.matched
        body += [f"<p class='banner'>{e(m_banner)}</p>", "<h2 id='matched'>Verdicts at matched side effects</h2>",
                 f"<p class='meta'>{e(paragraph)}</p>", _html_table(table)]
    elif page.banner:
        body.append(f"<p class='banner'>{e(page.banner)}</p>")
    heading = "Verdicts" if page.matched is None else "Alpha-sweep view (exploratory, not the verdict)"
    body += [f"<h2 id='verdicts'>{heading}</h2>", f"<p class='meta'>{e(page.header)}</p>"]
    for v in page.verdicts:
        fails = "".join(f"<li>{e(x)}</li>" for x in failure_lines(v))
        body.append(
            f"<div class='verdict {_verdict_class(v['verdict'])}'><b>{e(v['method'])} · "
            f"{e(v['scaling'])}{' (positive control)' if v.get('role') == stats.POSITIVE_CONTROL else ''}: "
            f"{e(v['verdict'])}</b><br>{e(v['explanation'])}"
            + (f"<details><summary>failed checks ({len(v['failures'])})</summary><ul>{fails}"
               f"</ul></details>" if v["failures"] else "") + "</div>")
    embeds = []
    for sec in page.sections:
        body.append(f"<h2>{e(sec.heading)}</h2>")
        if sec.note:
            body.append(f"<p class='meta'>{e(sec.note)}</p>")
        if sec.chart is not None:
            spec = page.charts[sec.chart]
            if spec.chart is None:
                body.append(f"<p class='na'>Chart {NOT_AVAILABLE}: {e(spec.missing)}.</p>")
            else:
                body.append(f"<div class='chart vega-chart' id='chart-{sec.chart}'></div>")
                embeds.append((sec.chart, spec.chart.to_json(indent=None)))
        if _empty(sec, page.charts):
            body.append(f"<p class='na'>{NOT_AVAILABLE}</p>")
        if sec.tables:
            rows = sum(len(t[1]) for _, t in sec.tables)
            inner = "".join(f"<h3>{e(sub)}</h3>{_html_table(t)}" for sub, t in sec.tables)
            is_open = " open" if sec.heading.endswith("decision alphas") or rows <= 12 else ""
            body.append(f"<details{is_open}><summary>tables ({len(sec.tables)}, {rows} rows)"
                        f"</summary>{inner}</details>")
    body.append("<h2>Provenance</h2>")
    body.append(f"<pre>{e(json.dumps(page.manifest, indent=2, default=str))}</pre>" if page.manifest
                else f"<p class='na'>{NOT_AVAILABLE} (no manifest.json)</p>")
    specs = "\n".join(
        f"vegaEmbed('#chart-{name}', {spec.replace('</', '<' + chr(92) + '/')}, "
        f"{{renderer: 'svg', actions: false}}).catch(function(err) {{"
        f"document.getElementById('chart-{name}').setAttribute('data-error', String(err));}});"
        for name, spec in embeds)
    js = js_bundle().replace("</script", "<\\/script")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>steercmp report: {e(page.title)}</title><style>{_CSS}</style>"
        f"<script>{js}</script></head><body>\n" + "\n".join(body)
        + f"\n<script>\n{specs}\n</script>\n</body></html>\n"
    )
