"""The report: render a run's :class:`~steercmp.stats.analysis.Analysis` as pages and charts.

``write_report(run_dir)`` (used by ``steercmp report`` and after ``steercmp run``) runs the stats
stage (:mod:`steercmp.run.analyse`: it needs only ``cells.parquet``, checks every table against
docs/schemas.md before anything is written, and writes the statistics tables and
``verdict.json``), then renders: polars transforms and Altair chart builders
(:mod:`.transforms`, :mod:`.charts`), then the pages (:mod:`.pages`). Every other input is
optional and its section says "not available" when it is missing. The page's title is the
experiment's name (config.yaml ``name``), else the run directory's name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from steercmp.api import ReportInputs, ReportSection, SectionContent
from steercmp.errors import PluginError
from steercmp.plugin_manager import PluginSet, build_plugin_manager
from steercmp.report import charts, transforms
from steercmp.report.pages import ChartSpec, Page, html_page, markdown, save_png
from steercmp.report.positive_control_section import reference_section
from steercmp.report.sections import Section, core_sections
from steercmp.report.summary_page import (
    decision_paragraph,
    pareto_chart,
    pareto_frame,
    summary_markdown,
    survival_warning,
    verdict_table,
)
from steercmp.report.text_tables import frame_table
from steercmp.run.analyse import analyse_run
from steercmp.run.rundir import RunDir
from steercmp.stats.analysis import Analysis, matched_banner


def _title(config: Mapping[str, Any], run: RunDir) -> str:
    """The experiment's name (config.yaml ``name``), else the run directory's name."""
    name = config.get("name")
    return str(name).strip() if name is not None and str(name).strip() else run.root.name


def _read_manifest(run: RunDir) -> dict[str, Any] | None:
    if not run.manifest.is_file():
        return None
    try:
        return json.loads(run.manifest.read_text())
    except json.JSONDecodeError as err:
        return {"error": f"manifest.json is not valid JSON: {err}"}


def _method_tables(run: RunDir) -> Callable[[str], dict[str, pl.DataFrame]]:
    def read(name: str) -> dict[str, pl.DataFrame]:
        return {m: pl.read_parquet(p) for m, p in run.method_tables(name).items()}

    return read


def _plugin_section(section: ReportSection, inputs: ReportInputs) -> tuple[Section, ChartSpec]:
    try:
        content = section.build(inputs)
    except Exception as exc:
        raise PluginError(f"report section {section.name!r} raised: {type(exc).__name__}: {exc}",
                          fix="fix or uninstall the plugin that registers it") from exc
    if content is None:
        return Section(section.title, section.name), ChartSpec(section.title, None, section.missing)
    if not isinstance(content, SectionContent):
        raise PluginError(f"report section {section.name!r} returned {type(content).__name__}",
                          fix="return steercmp.api.SectionContent or None")
    tables = [(sub, frame_table(df)) for sub, df in content.tables]
    chart = ChartSpec(section.title, content.chart, "" if content.chart is not None else section.missing)
    return Section(section.title, section.name, tables, content.note), chart


def write_report(
    run_dir: Path,
    *,
    decision_alphas: Sequence[float] | None = None,
    n_boot: int = 10_000,
    seed: int | None = None,
    out_dir: Path | None = None,
    plugins: PluginSet | None = None,
    level: float | None = None,
    correction: str | None = None,
) -> Path:
    """Write the comparison report for ``run_dir`` and return the report directory.

    The stats stage (:func:`steercmp.run.analyse.analyse_run`) reads ``cells.parquet``
    (required), ``completions.parquet``, ``matched*.parquet`` and ``config.yaml``, and writes the
    statistics tables and ``verdict.json`` (docs/schemas.md); the arguments left None come from
    config.yaml's ``decision`` section and ``seed``. This function only renders that analysis:
    summary.md (and details.md), report.html (self-contained: Vega JS inlined) and one PNG per
    chart, into ``out_dir`` (default ``run_dir/report``). ``plugins`` adds their report sections
    (default: the built-in and installed plugins).
    """
    done = analyse_run(run_dir, decision_alphas=decision_alphas, n_boot=n_boot, seed=seed, level=level,
                       correction=correction, out_dir=out_dir)
    a, run, out = done.analysis, done.run, done.out
    plugins = plugins if plugins is not None else build_plugin_manager()
    chart_specs = _core_charts(a)
    sections = [reference_section(a.reference, list(a.settings.alphas)),
                *core_sections(a)]
    inputs = ReportInputs(run_dir=run.root, cells=a.cells, completions=a.completions,
                          decision_alphas=a.settings.alphas, seed=a.settings.seed, read_tables=_method_tables(run))
    for plugin_section in plugins.report_sections():
        if plugin_section.name in chart_specs:
            raise PluginError(f"report section {plugin_section.name!r} clashes with a core chart",
                              fix="rename the section")
        section, spec = _plugin_section(plugin_section, inputs)
        sections.append(section)
        chart_specs[plugin_section.name] = spec
    for name, spec in chart_specs.items():
        if spec.chart is not None:
            save_png(spec.chart, out / f"{name}.png")
    _write_pages(a, _title(done.config, run), sections, chart_specs, _read_manifest(run), out)
    return out


def _core_charts(a: Analysis) -> dict[str, ChartSpec]:
    """The core charts (transforms -> builders); a chart without data says why."""
    alphas, specs = list(a.settings.alphas), {}

    def add(name: str, title: str, frame: pl.DataFrame | None, build: Callable[[pl.DataFrame], Any],
            why: str) -> None:
        specs[name] = (ChartSpec(title, None, why) if frame is None or frame.is_empty()
                       else ChartSpec(title, build(frame)))

    add("dose_response", "Dose-response relative to noop", transforms.dose_frame(a.relative),
        charts.dose_response_chart, "no usable paired scores")
    add("per_prompt_heatmap", "Per-prompt heterogeneity", transforms.heatmap_frame(a.heterogeneity, alphas),
        charts.heatmap_chart, "no cells at the decision alphas")
    add("forest", "Paired effects vs each control", transforms.forest_frame(a.paired_score, a.paired_hits, alphas),
        charts.forest_chart, "no paired comparisons at the decision alphas")
    add("hit_rates", "Completion hit rates", transforms.hits_frame(a.hits) if a.hits is not None else None,
        charts.hit_rate_chart, "no completions.parquet")
    matched = a.matched_verdicts
    if matched is not None:
        add("pareto", "Score against side effect: dose curves and matched points", pareto_frame(a.cells, matched),
            lambda f: pareto_chart(f, matched), "no off-target KL in cells.parquet")
    add("injected_norm", "Target effect against injected norm",
        transforms.matched_norm_frame(a.cells, n_boot=min(a.settings.n_boot, 2_000), seed=a.settings.seed),
        charts.matched_norm_chart, "no activation method with a non-zero delta")
    return specs


def _write_pages(a: Analysis, title: str, sections: list[Section], chart_specs: dict[str, ChartSpec],
                 manifest: dict[str, Any] | None, out: Path) -> None:
    """summary.md (the matched-dose screen; the alpha-sweep page moves to details.md) and report.html."""
    s = a.settings
    across = ("none: each verdict is its own claim" if s.correction == "none"
              else f"Holm over the {len(a.method_pairs)} method · scaling verdicts")
    header = (f"Decision alphas (pre-declared): {', '.join(f'{x:g}' for x in s.alphas)}; controls: "
              f"{', '.join(a.controls)}. A metric is won when, against EVERY applicable control at every "
              f"decision alpha, the one-sided exact sign-flip p < {s.level:g}, the 95% CI lies above 0 and "
              f"the mean difference is positive (intersection-union test: no correction across controls); "
              f"correction across methods: {across}. Supported = logmass and edited-family completion "
              f"hits won; underpowered = too few usable prompts for any outcome to pass. "
              f"Primary analysis: fallback and gated prompts excluded. Bootstrap: {s.n_boot} resamples, seed {s.seed}.")
    matched = a.matched_verdicts
    if matched is not None:
        header = "Exploratory dose-response view (alpha sweep, not the verdict). " + header
    notice = f"{a.pending[1]} " if a.pending is not None else ""
    page = Page(title=title, header=header, verdicts=a.verdicts, sections=sections, charts=chart_specs,
                manifest=manifest, banner=notice + a.site,
                matched=None if matched is None else (
                    notice + matched_banner(matched), decision_paragraph(s.decision, s.preregistered),
                    verdict_table(matched)))
    if matched is not None:
        warnings = [w for w in (a.pending[1] if a.pending is not None else None, survival_warning(a.cells)) if w]
        (out / "summary.md").write_text(summary_markdown(title, matched, s.decision, s.preregistered, warnings))
        (out / "details.md").write_text(markdown(page))
    else:
        (out / "summary.md").write_text(markdown(page))
    (out / "report.html").write_text(html_page(page))
