"""Layer 3 of the report: read a run directory, compute statistics, write every artifact.

``write_report(run_dir)`` is the single public entry (used by ``steercmp report`` and at the end
of ``steercmp run``). It only needs ``cells.parquet``; every other input is optional and its
report section says "not available" when it is missing.
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl
import vl_convert as vlc
import yaml

from steercmp import stats
from steercmp.errors import ConfigError
from steercmp.report import charts, transforms

CELLS = "cells.parquet"
COMPLETIONS = "completions.parquet"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
SELECTIONS_GLOB = "methods/*/selections.parquet"
REPORT_DIR = "report"
NOT_AVAILABLE = "not available"
VL_VERSION = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
COND_RANK = {c: i for i, c in enumerate(charts.CONDITION_ORDER)}


# ---------------------------------------------------------------- inputs

def _read_optional_parquet(path: Path) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path.is_file() else None


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError("config is not a mapping", where=str(path), fix="write a YAML mapping")
    return data


def _decision_alphas(arg: Sequence[float] | None, config: dict, run_dir: Path) -> list[float]:
    if arg:
        return [float(a) for a in arg]
    decision = config.get("decision") or {}
    raw = decision.get("alphas") if isinstance(decision, dict) else None
    if raw is not None and not isinstance(raw, list | tuple):
        raw = [raw]
    if raw:
        try:
            return [float(a) for a in raw]
        except (TypeError, ValueError):
            raise ConfigError(f"decision.alphas must be numbers, got {raw!r}",
                              where=str(run_dir / CONFIG),
                              fix="write e.g. decision: {alphas: [2, 4]}") from None
    raise ConfigError(
        "no pre-declared decision alphas",
        where=str(run_dir / CONFIG),
        fix="set decision.alphas in config.yaml (e.g. decision: {alphas: [2, 4]}) "
            "or pass decision_alphas / --decision-alpha",
    )


def _selections(run_dir: Path) -> pl.DataFrame | None:
    frames = []
    for path in sorted(run_dir.glob(SELECTIONS_GLOB)):
        df = pl.read_parquet(path)
        if "selection" in df.columns and "prompt_id" in df.columns:
            frames.append(df.with_columns(pl.lit(path.parent.name).alias("method")))
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


# ---------------------------------------------------------------- formatting helpers

def _f(x: Any, fmt: str = "+.3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NA"
    if isinstance(x, float):
        return format(x, fmt)
    return str(x)


def _p(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NA"
    return f"{x:.4f}" if x >= 1e-4 else f"{x:.1e}"


def _ci(lo: Any, hi: Any, fmt: str = "+.3f") -> str:
    return "NA" if lo is None else f"[{_f(lo, fmt)}, {_f(hi, fmt)}]"


def _cond_sort(df: pl.DataFrame, col: str = "condition") -> pl.DataFrame:
    return df.with_columns(
        pl.col(col).replace_strict(COND_RANK, default=99, return_dtype=pl.Int64).alias("_rank")
    )


Table = tuple[list[str], list[list[str]]]


def _summary_table(summary: pl.DataFrame) -> Table:
    df = _cond_sort(summary).sort("alpha", "_rank", "condition")
    rows = [[r["condition"], f"{r['alpha']:g}", _f(r["mean"]), _f(r["median"]),
             f"{r['n_positive']}/{r['n']}", _ci(r["ci_low"], r["ci_high"]), str(r["n_excluded"])]
            for r in df.iter_rows(named=True)]
    return (["condition", "alpha", "mean edited−original logmass", "median", "positive prompts",
             "95% CI (mean)", "excluded"], rows)


def _paired_table(paired: pl.DataFrame, fmt: str = "+.3f") -> Table:
    df = _cond_sort(paired, "control").sort("alpha", "_rank")
    rows = [[f"{r['alpha']:g}", r["control"], str(r["n"]), _f(r["mean_diff"], fmt),
             _ci(r["ci_low"], r["ci_high"], fmt), _p(r["p_value"]), _p(r["p_holm"])]
            for r in df.iter_rows(named=True)]
    return (["alpha", "control", "n", "mean diff (target − control)", "95% CI", "p (sign-flip)",
             "p (Holm)"], rows)


def _hits_table(hits: pl.DataFrame) -> Table:
    df = _cond_sort(hits).sort("alpha", "_rank", "family")
    rows = [[r["condition"], f"{r['alpha']:g}", r["family"], _f(r["rate"], ".3f"),
             _ci(r["ci_low"], r["ci_high"], ".3f"), str(r["n_prompts"]), str(r["n_completions"])]
            for r in df.iter_rows(named=True)]
    return (["condition", "alpha", "family", "hit rate", "95% CI", "prompts", "completions"], rows)


def _noop_table(rel: pl.DataFrame) -> Table:
    df = _cond_sort(rel).sort("alpha", "_rank")
    rows = [[r["condition"], f"{r['alpha']:g}", str(r["n"]), _f(r["mean_diff"]),
             _ci(r["ci_low"], r["ci_high"]), _p(r["p_value"])] for r in df.iter_rows(named=True)]
    return (["condition", "alpha", "n", "mean diff vs noop", "95% CI", "p (unadjusted)"], rows)


def _peaks_table(pk: pl.DataFrame) -> Table:
    df = _cond_sort(pk).sort("_rank")
    rows = [[r["condition"], f"{r['peak_alpha']:g}", _f(r["peak_mean"]),
             _ci(r["peak_ci_low"], r["peak_ci_high"]), str(r["n_alphas"])]
            for r in df.iter_rows(named=True)]
    return (["condition", "peak alpha", "mean at peak", "95% CI", "alphas swept"], rows)


def _frame_table(df: pl.DataFrame) -> Table:
    rows = [[_f(v, "+.3f") if isinstance(v, float) else ("" if v is None else str(v))
             for v in r] for r in df.iter_rows()]
    return (list(df.columns), rows)


def _md(table: Table) -> str:
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
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=1)
def _js_bundle() -> str:
    return vlc.javascript_bundle(vl_version=VL_VERSION)


def _save_png(chart: alt.TopLevelMixin, path: Path) -> None:
    png = vlc.vegalite_to_png(chart.to_json(), vl_version=VL_VERSION, scale=2)
    path.write_bytes(png)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:0.2em} h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:2em}
table{border-collapse:collapse;margin:0.5em 0 1em;font-size:0.85em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f5f5f5}
td:first-child,th:first-child{text-align:left}
.verdict{border-left:6px solid #999;padding:0.5em 1em;margin:0.6em 0;background:#fafafa}
.v-supported{border-color:#2ca02c}.v-shift{border-color:#ff7f0e}.v-not{border-color:#d62728}
.na{color:#888;font-style:italic} .meta{color:#666;font-size:0.9em}
.chart{margin:1em 0;overflow-x:auto} pre{background:#f5f5f5;padding:0.8em;overflow-x:auto;font-size:0.8em}
details{margin:0.3em 0}
"""


def _verdict_class(v: str) -> str:
    return {stats.SUPPORTED: "v-supported", stats.SHIFT_ONLY: "v-shift"}.get(v, "v-not")


def _failure_lines(v: dict, limit: int = 12) -> list[str]:
    lines = [f"{c['metric']} α={c['alpha']:g} vs {c['control']}: {c['reason']}"
             for c in v["failures"]]
    if len(lines) > limit:
        lines = lines[:limit] + [f"… and {len(lines) - limit} more (see verdict.json)"]
    return lines


# ---------------------------------------------------------------- entry point

def write_report(
    run_dir: Path,
    *,
    decision_alphas: Sequence[float] | None = None,
    n_boot: int = 10_000,
    seed: int | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Write the comparison report for ``run_dir`` and return the report directory.

    Reads ``cells.parquet`` (required), and if present ``completions.parquet``,
    ``config.yaml`` (``decision.alphas`` and ``seed`` are the defaults when the arguments are
    None; seed falls back to 0), ``manifest.json`` and ``methods/*/selections.parquet``.
    Writes into ``out_dir`` (default ``run_dir/report``): summary.parquet, paired.parquet,
    paired_completions.parquet, hit_rates.parquet, relative_to_noop.parquet, verdict.json,
    summary.md, report.html (self-contained: Vega JS inlined) and one PNG per chart.
    Raises :class:`steercmp.errors.ConfigError` if cells.parquet is missing or no decision
    alphas are declared anywhere.
    """
    run_dir = Path(run_dir)
    cells_path = run_dir / CELLS
    if not cells_path.is_file():
        raise ConfigError("cells.parquet not found", where=str(run_dir),
                          fix="run `steercmp run` first or point at a run directory")
    config = _read_config(run_dir)
    alphas = _decision_alphas(decision_alphas, config, run_dir)
    if seed is None:
        seed = int(config.get("seed", 0) or 0)
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    cells = pl.read_parquet(cells_path)
    completions = _read_optional_parquet(run_dir / COMPLETIONS)
    if completions is not None and completions.is_empty():
        completions = None
    selections = _selections(run_dir)
    manifest = None
    if (run_dir / MANIFEST).is_file():
        try:
            manifest = json.loads((run_dir / MANIFEST).read_text())
        except json.JSONDecodeError as err:
            manifest = {"error": f"manifest.json is not valid JSON: {err}"}

    # ---- statistics (pure functions)
    summary = stats.summarize(cells, n_boot=n_boot, seed=seed)
    paired_score = stats.paired(cells, n_boot=n_boot, seed=seed)
    rel = stats.relative_to_noop(cells, n_boot=n_boot, seed=seed)
    pk = stats.peaks(summary)
    het = stats.heterogeneity(cells)
    hits = paired_hits = None
    if completions is not None:
        hits = stats.hit_rates(completions, n_boot=n_boot, seed=seed)
        paired_hits = stats.paired_hits(completions, n_boot=n_boot, seed=seed)
    method_pairs = sorted({(r["method"], r["scaling"])
                           for r in cells.select("method", "scaling").unique().to_dicts()})
    # controls whose every cell is not_applicable for a method (e.g. wrong_position for prompting)
    status = cells.group_by("method", "condition").agg(
        na=(pl.col("status") == "not_applicable").all())
    not_applicable: dict[str, list[str]] = {}
    for r in status.filter(pl.col("na")).iter_rows(named=True):
        not_applicable.setdefault(r["method"], []).append(r["condition"])
    verdicts = stats.verdict(paired_score, paired_hits, decision_alphas=alphas,
                             methods=method_pairs, not_applicable=not_applicable)

    summary.write_parquet(out / "summary.parquet")
    paired_score.write_parquet(out / "paired.parquet")
    rel.write_parquet(out / "relative_to_noop.parquet")
    if paired_hits is not None:
        paired_hits.write_parquet(out / "paired_completions.parquet")
    if hits is not None:
        hits.write_parquet(out / "hit_rates.parquet")
    (out / "verdict.json").write_text(json.dumps({
        "decision_alphas": alphas, "controls": list(stats.CONTROLS), "level": 0.05,
        "n_boot": n_boot, "seed": seed, "completions_available": completions is not None,
        "verdicts": verdicts,
    }, indent=2, default=str) + "\n")

    # ---- charts (transforms -> builders)
    chart_specs: dict[str, tuple[str, alt.TopLevelMixin | None, str]] = {}

    def add(name: str, title: str, frame_fn, build_fn, why: str) -> None:  # type: ignore[no-untyped-def]
        frame = frame_fn()
        if frame is None or frame.is_empty():
            chart_specs[name] = (title, None, why)
        else:
            chart_specs[name] = (title, build_fn(frame), "")

    add("dose_response", "Dose-response", lambda: transforms.dose_frame(summary),
        charts.dose_response_chart, "no usable scores")
    add("per_prompt_heatmap", "Per-prompt heterogeneity",
        lambda: transforms.heatmap_frame(het, alphas), charts.heatmap_chart,
        "no cells at the decision alphas")
    add("forest", "Paired effects vs each control",
        lambda: transforms.forest_frame(paired_score, paired_hits, alphas), charts.forest_chart,
        "no paired comparisons at the decision alphas")
    add("hit_rates", "Completion hit rates",
        lambda: transforms.hits_frame(hits) if hits is not None else None,
        charts.hit_rate_chart, "no completions.parquet")
    add("nla_fidelity", "NLA fidelity and selection",
        lambda: transforms.nla_frame(selections) if selections is not None else None,
        charts.nla_chart, "no methods/*/selections.parquet")
    methods_present = set(cells["method"].unique().to_list())
    both = {transforms.NLA_METHOD, transforms.SAE_METHOD} <= methods_present
    add("nla_vs_sae", "NLA vs SAE at matched delta norm",
        lambda: transforms.matched_norm_frame(cells, n_boot=min(n_boot, 2_000), seed=seed)
        if both else None,
        charts.matched_norm_chart,
        f"needs both {transforms.NLA_METHOD} and {transforms.SAE_METHOD} in cells.parquet")

    for name, (_, chart, _) in chart_specs.items():
        if chart is not None:
            _save_png(chart, out / f"{name}.png")

    # ---- text
    md = _markdown(run_dir, alphas, seed, n_boot, verdicts, summary, paired_score, paired_hits,
                   hits, rel, pk, het, selections, manifest, chart_specs)
    (out / "summary.md").write_text(md)
    (out / "report.html").write_text(
        _html(run_dir, alphas, seed, n_boot, verdicts, summary, paired_score, paired_hits, hits,
              rel, pk, het, selections, manifest, chart_specs))
    return out


def _per_panel(df: pl.DataFrame | None) -> list[tuple[str, str, pl.DataFrame]]:
    if df is None or df.is_empty():
        return []
    return [(m, s, df.filter((pl.col("method") == m) & (pl.col("scaling") == s)))
            for m, s in sorted({(r["method"], r["scaling"])
                                for r in df.select("method", "scaling").unique().to_dicts()})]


def _het_tables(het: pl.DataFrame, alphas: list[float]) -> list[tuple[str, Table]]:
    out = []
    for m, s, part in _per_panel(het):
        for a in alphas:
            t = stats.heterogeneity_table(part, method=m, scaling=s, alpha=a)
            if t.height:
                cols = ["prompt_id", "selection"] + sorted(
                    (c for c in t.columns if c not in ("prompt_id", "selection")),
                    key=lambda c: COND_RANK.get(c, 99))
                out.append((f"{m} · {s} · α={a:g}", _frame_table(t.select(cols))))
    return out


def _sections(alphas, verdicts, summary, paired_score, paired_hits, hits, rel, pk, het,
              selections, manifest):  # type: ignore[no-untyped-def]
    """(heading, chart name or None, [(subheading, Table)], note) in report order."""
    secs = []
    at_decision = summary.filter(
        pl.any_horizontal([(pl.col("alpha") - a).abs() < 1e-9 for a in alphas]))
    secs.append(("Logmass score at the decision alphas", "dose_response",
                 [(f"{m} · {s}", _summary_table(p)) for m, s, p in _per_panel(at_decision)],
                 "mean / median of edited − original next-token log-prob mass over prompts; "
                 "positive = prompts with score > 0; 95% CI = percentile bootstrap over prompts."))
    secs.append(("Logmass score, full alpha sweep", None,
                 [(f"{m} · {s}", _summary_table(p)) for m, s, p in _per_panel(summary)], ""))
    secs.append(("Paired comparisons: logmass (target_edit − control)", "forest",
                 [(f"{m} · {s}", _paired_table(p)) for m, s, p in _per_panel(paired_score)],
                 "per-prompt differences; exact sign-flip permutation test (Monte Carlo above "
                 "20 prompts), Holm-adjusted across controls within method, scaling, alpha."))
    secs.append(("Completion hit rates", "hit_rates",
                 [(f"{m} · {s}", _hits_table(p)) for m, s, p in _per_panel(hits)],
                 "seeds averaged within each prompt first; 95% CI = percentile bootstrap "
                 "over prompts."))
    secs.append(("Paired comparisons: edited-family completion hits", None,
                 [(f"{m} · {s}", _paired_table(p)) for m, s, p in _per_panel(paired_hits)],
                 "per-prompt seed-averaged edited-family hit rate, target minus control."))
    secs.append(("Effect relative to noop", None,
                 [(f"{m} · {s}", _noop_table(p)) for m, s, p in _per_panel(rel)],
                 "condition − noop per prompt (unadjusted p)."))
    secs.append(("Dose-response peaks (descriptive; not used for the verdict)", None,
                 [(f"{m} · {s}", _peaks_table(p)) for m, s, p in _per_panel(pk)], ""))
    secs.append(("Per-prompt heterogeneity", "per_prompt_heatmap", _het_tables(het, alphas),
                 "score per prompt and condition at the decision alphas; selection = status "
                 "of the prompt's target_edit row."))
    nla_tables = []
    if selections is not None:
        cols = [c for c in ("method", "prompt_id", "selection", "sample", "cosine", "fve_nrm",
                            "mse_nrm", "delta_norm", "unrelated_delta_norm")
                if c in selections.columns]
        nla_tables.append(("selections", _frame_table(selections.select(cols).sort(cols[:2]))))
    secs.append(("NLA fidelity and selection status", "nla_fidelity", nla_tables, ""))
    secs.append(("NLA vs SAE at matched delta norm", "nla_vs_sae", [],
                 "target_edit score against the injected norm ‖δ‖·|α| (raw scaling when "
                 "available)."))
    return secs


def _verdict_header(alphas: list[float], seed: int, n_boot: int) -> str:
    return (f"Decision alphas (pre-declared): {', '.join(f'{a:g}' for a in alphas)}; controls: "
            f"{', '.join(stats.CONTROLS)}; win = Holm p < 0.05 and 95% CI > 0 on every control "
            f"at every decision alpha, on both logmass and edited-family completion hits. "
            f"Bootstrap: {n_boot} resamples, seed {seed}.")


def _markdown(run_dir, alphas, seed, n_boot, verdicts, summary, paired_score, paired_hits, hits,
              rel, pk, het, selections, manifest, chart_specs) -> str:  # type: ignore[no-untyped-def]
    lines = [f"# steercmp report: {run_dir.name}", "", "## Verdicts", "",
             _verdict_header(alphas, seed, n_boot), ""]
    for v in verdicts:
        lines.append(f"- **{v['method']} · {v['scaling']}: {v['verdict']}** — {v['explanation']}")
        lines += [f"  - {line}" for line in _failure_lines(v)]
    lines.append("")
    for head, chart, tables, note in _sections(alphas, verdicts, summary, paired_score,
                                               paired_hits, hits, rel, pk, het, selections,
                                               manifest):
        lines += [f"## {head}", ""]
        if note:
            lines += [note, ""]
        if chart is not None:
            title, ch, why = chart_specs[chart]
            lines += [f"Chart: `{chart}.png`" if ch is not None
                      else f"Chart: {NOT_AVAILABLE} ({why}).", ""]
        if not tables and (chart is None or chart_specs[chart][1] is None):
            lines += [f"_{NOT_AVAILABLE}_", ""]
        for sub, table in tables:
            lines += [f"### {sub}", "", _md(table)]
    lines += ["## Provenance", ""]
    lines += (["```json", json.dumps(manifest, indent=2, default=str), "```"] if manifest
              else [f"_{NOT_AVAILABLE}_ (no manifest.json)"])
    return "\n".join(lines) + "\n"


def _html(run_dir, alphas, seed, n_boot, verdicts, summary, paired_score, paired_hits, hits,
          rel, pk, het, selections, manifest, chart_specs) -> str:  # type: ignore[no-untyped-def]
    e = html.escape
    body = [f"<h1>steercmp report: {e(run_dir.name)}</h1>",
            "<h2 id='verdicts'>Verdicts</h2>", f"<p class='meta'>{e(_verdict_header(alphas, seed, n_boot))}</p>"]
    for v in verdicts:
        fails = "".join(f"<li>{e(x)}</li>" for x in _failure_lines(v))
        body.append(
            f"<div class='verdict {_verdict_class(v['verdict'])}'><b>{e(v['method'])} · "
            f"{e(v['scaling'])}: {e(v['verdict'])}</b><br>{e(v['explanation'])}"
            + (f"<details><summary>failed checks ({len(v['failures'])})</summary><ul>{fails}"
               f"</ul></details>" if v["failures"] else "") + "</div>")
    embeds = []
    for head, chart, tables, note in _sections(alphas, verdicts, summary, paired_score,
                                               paired_hits, hits, rel, pk, het, selections,
                                               manifest):
        body.append(f"<h2>{e(head)}</h2>")
        if note:
            body.append(f"<p class='meta'>{e(note)}</p>")
        if chart is not None:
            _, ch, why = chart_specs[chart]
            if ch is None:
                body.append(f"<p class='na'>Chart {NOT_AVAILABLE}: {e(why)}.</p>")
            else:
                body.append(f"<div class='chart vega-chart' id='chart-{chart}'></div>")
                embeds.append((chart, ch.to_json(indent=None)))
        if not tables and (chart is None or chart_specs[chart][1] is None):
            body.append(f"<p class='na'>{NOT_AVAILABLE}</p>")
        if tables:
            rows = sum(len(t[1]) for _, t in tables)
            inner = "".join(f"<h3>{e(sub)}</h3>{_html_table(t)}" for sub, t in tables)
            is_open = " open" if head.endswith("decision alphas") or rows <= 12 else ""
            body.append(f"<details{is_open}><summary>tables ({len(tables)}, {rows} rows)"
                        f"</summary>{inner}</details>")
    body.append("<h2>Provenance</h2>")
    body.append(f"<pre>{e(json.dumps(manifest, indent=2, default=str))}</pre>" if manifest
                else f"<p class='na'>{NOT_AVAILABLE} (no manifest.json)</p>")
    specs = "\n".join(
        f"vegaEmbed('#chart-{name}', {spec.replace('</', '<' + chr(92) + '/')}, "
        f"{{renderer: 'svg', actions: false}}).catch(function(err) {{"
        f"document.getElementById('chart-{name}').setAttribute('data-error', String(err));}});"
        for name, spec in embeds)
    js = _js_bundle().replace("</script", "<\\/script")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>steercmp report: {e(run_dir.name)}</title><style>{_CSS}</style>"
        f"<script>{js}</script></head><body>\n" + "\n".join(body)
        + f"\n<script>\n{specs}\n</script>\n</body></html>\n"
    )
