"""The report's entry point: read a run directory, compute statistics, write every artifact.

``write_report(run_dir)`` (used by ``steercmp report`` and after ``steercmp run``) only needs
``cells.parquet``; every other input is optional and its section says "not available" when it
is missing. Both tables are checked against docs/schemas.md (:mod:`steercmp.tables`) before
anything is written: a bad table is one ConfigError line and the run directory stays as it was.
Three layers: statistics (:mod:`steercmp.stats`), then polars transforms and Altair chart
builders (:mod:`.transforms`, :mod:`.charts`), then the pages (:mod:`.pages`). The page's
title is the experiment's name (config.yaml ``name``), else the run directory's name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from steercmp import stats
from steercmp.api import ReportInputs, ReportSection, SectionContent
from steercmp.decision_settings import (
    DEFAULT_MIN_EFFECT,
    DEFAULT_RANDOM_DRAWS,
    check_correction,
    check_level,
)
from steercmp.errors import ConfigError, PluginError
from steercmp.plugin_manager import PluginSet, build_plugin_manager
from steercmp.report import charts, transforms
from steercmp.report.matched import banner as matched_banner
from steercmp.report.matched import (
    decision_paragraph,
    pareto_chart,
    pareto_frame,
    summary_markdown,
    survival_warning,
    verdict_table,
)
from steercmp.report.pages import ChartSpec, Page, html_page, markdown, save_png
from steercmp.report.reference import (
    build_reference,
    order_verdicts,
    reference_section,
    roles_of,
    site_banner,
)
from steercmp.report.sections import Section, core_sections
from steercmp.report.tables import frame_table
from steercmp.run.rundir import RunDir
from steercmp.tables import CELLS, COMPLETIONS, MATCHED, read_table


def _read_config(run: RunDir) -> dict[str, Any]:
    if not run.config.is_file():
        return {}
    data = yaml.safe_load(run.config.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError("config is not a mapping", where=str(run.config), fix="write a YAML mapping")
    return data


def _title(config: dict, run: RunDir) -> str:
    """The experiment's name (config.yaml ``name``), else the run directory's name."""
    name = config.get("name")
    return str(name).strip() if name is not None and str(name).strip() else run.root.name


def _decision_alphas(arg: Sequence[float] | None, config: dict, run: RunDir) -> list[float]:
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
            raise ConfigError(f"decision.alphas must be numbers, got {raw!r}", where=str(run.config),
                              fix="write e.g. decision: {alphas: [2, 4]}") from None
    raise ConfigError("no pre-declared decision alphas", where=str(run.config),
                      fix="set decision.alphas in config.yaml (e.g. decision: {alphas: [2, 4]}) "
                          "or pass --alphas to `steercmp report`")


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


def _decision_setting(config: dict, run: RunDir, level: float | None, correction: str | None) -> tuple[float, str]:
    """The level and the correction across methods: arguments, else config.yaml, else defaults."""
    decision = config.get("decision") if isinstance(config.get("decision"), dict) else {}
    where = str(run.config)
    level = check_level(level if level is not None else decision.get("level", 0.05),
                        where=f"{where}: decision.level" if level is None else "--level")
    correction = check_correction(correction if correction is not None else decision.get("correction", "none"),
                                  where=f"{where}: decision.correction" if correction is None else "--correction")
    return level, correction


def present_controls(cells: pl.DataFrame) -> list[str]:
    """The run's controls: every condition but the target, known ones in the usual order."""
    present = [c for c in cells["condition"].unique().to_list() if c != stats.TARGET]
    return [c for c in stats.CONTROLS if c in present] + sorted(c for c in present if c not in stats.CONTROLS)


def _not_applicable(cells: pl.DataFrame) -> dict[str, list[str]]:
    """Controls whose every cell is not_applicable for a method (e.g. wrong_position for prompting)."""
    status = cells.group_by("method", "condition").agg(na=(pl.col("status") == "not_applicable").all())
    out: dict[str, list[str]] = {}
    for r in status.filter(pl.col("na")).iter_rows(named=True):
        out.setdefault(r["method"], []).append(r["condition"])
    return out


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

    Reads ``cells.parquet`` (required), and if present ``completions.parquet`` (both checked
    against docs/schemas.md; a completions table with no rows means no completions),
    ``config.yaml`` (``name`` titles the report; ``decision.alphas`` and ``seed`` are the
    defaults when the arguments are None; seed falls back to 0), ``manifest.json`` and the
    methods' tables. Writes into ``out_dir`` (default ``run_dir/report``): summary.parquet,
    summary_secondary.parquet, paired.parquet, paired_completions.parquet,
    hit_rates.parquet, relative_to_noop.parquet, positive_control.parquet (when the run has a
    positive control), absolute_logmass.parquet, verdict.json (``site`` says first whether
    anything tested steers the site), summary.md, report.html
    (self-contained: Vega JS inlined) and one PNG per chart. ``plugins`` adds their report
    sections (default: the built-in and installed plugins). ``level`` and ``correction`` (across
    methods) default to config.yaml's ``decision`` section, else 0.05 and none.
    """
    run = RunDir(run_dir)
    if not run.cells.is_file():
        raise ConfigError("cells.parquet not found", where=str(run.root),
                          fix="run `steercmp run` first or point at a run directory")
    config = _read_config(run)
    alphas = _decision_alphas(decision_alphas, config, run)
    level, correction = _decision_setting(config, run, level, correction)
    if seed is None:
        seed = int(config.get("seed", 0) or 0)
    plugins = plugins if plugins is not None else build_plugin_manager()

    cells = read_table(run.cells, CELLS)
    completions = read_table(run.completions, COMPLETIONS) if run.completions.is_file() else None
    if completions is not None and completions.is_empty():
        completions = None
    swept = set(cells["alpha"].unique().to_list())
    unswept = [a for a in alphas if not any(abs(a - b) < 1e-9 for b in swept)]
    if unswept:
        raise ConfigError(f"decision alpha {unswept[0]:g} was not swept (the run has alphas "
                          f"{', '.join(f'{a:g}' for a in sorted(swept))})",
                          where="--alphas" if decision_alphas else f"{run.config}: decision.alphas",
                          fix="pick decision alphas from the swept alphas")
    out = Path(out_dir) if out_dir is not None else run.report
    out.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(run)
    partial = _partial_notice(run)

    # ---- statistics (pure functions)
    controls = present_controls(cells)
    summary = stats.summarize(cells, n_boot=n_boot, seed=seed)
    secondary = stats.summarize(cells, n_boot=n_boot, seed=seed, subset=stats.SECONDARY)
    secondary = secondary.filter(pl.col("n") > 0)
    paired_score = stats.paired(cells, controls=controls, n_boot=n_boot, seed=seed, level=level)
    rel = stats.relative_to_noop(cells, n_boot=n_boot, seed=seed)
    pk = stats.peaks(summary)
    het = stats.heterogeneity(cells)
    hits = paired_hits = None
    if completions is not None:
        hits = stats.hit_rates(completions, n_boot=n_boot, seed=seed)
        paired_hits = stats.paired_hits(completions, controls=controls, n_boot=n_boot, seed=seed, level=level)
    roles, positive, ceilings = roles_of(cells)
    method_pairs = sorted({(r["method"], r["scaling"]) for r in cells.select("method", "scaling").unique().to_dicts()
                           if r["method"] not in ceilings})  # a ceiling is a reference row, not a method
    verdicts = order_verdicts(stats.verdict(paired_score, paired_hits, decision_alphas=alphas, methods=method_pairs,
                                            controls=controls, not_applicable=_not_applicable(cells), level=level,
                                            correction=correction), roles)
    reference = build_reference(cells, alphas, n_boot=n_boot, seed=seed, run=run)
    banner = site_banner(verdicts, reference)
    decision = _declared(config, alphas, level, correction)
    matched_verdicts = None
    if run.matched.is_file():
        matched = read_table(run.matched, MATCHED)
        mcomp = read_table(run.matched_completions, COMPLETIONS) if run.matched_completions.is_file() else None
        matched_verdicts = stats.matched_verdicts(
            matched, mcomp, level=level, min_effect=decision["min_effect"], n_boot=n_boot, seed=seed,
            roles=roles, methods=[m for m in matched["method"].unique(maintain_order=True).to_list()
                                  if m not in ceilings])
        matched_verdicts.sort(key=lambda v: v.get("role") != stats.POSITIVE_CONTROL)
        for v in matched_verdicts:
            if mcomp is not None and v["completions"] and all(c["outcome"] == "cannot tell"
                                                                for c in v["completions"].values()):
                v["expected_edited_hits"] = stats.expected_hits(matched, v["method"], _seeds(config))

    summary.write_parquet(out / "summary.parquet")
    paired_score.write_parquet(out / "paired.parquet")
    rel.write_parquet(out / "relative_to_noop.parquet")
    if paired_hits is not None:
        paired_hits.write_parquet(out / "paired_completions.parquet")
    if hits is not None:
        hits.write_parquet(out / "hit_rates.parquet")
    if not secondary.is_empty():
        secondary.write_parquet(out / "summary_secondary.parquet")
    if not reference.fractions.is_empty():
        reference.fractions.write_parquet(out / "positive_control.parquet")
    reference.logmass.write_parquet(out / "absolute_logmass.parquet")
    if not reference.cosines.is_empty():
        reference.cosines.write_parquet(out / "positive_control_cosine.parquet")
    sweep = {"site": banner, "decision_alphas": alphas, "controls": controls, "level": level,
             "rule": "intersection-union at the decision alphas (exploratory dose-response view)",
             "correction_across_controls": "none (intersection-union test)", "correction_across_methods": correction,
             "verdicts": verdicts}
    preregistered = decision.pop("preregistered")
    head: dict[str, Any] = {"positive_control": positive, "ceilings": list(ceilings), "decision": decision,
                            "preregistered": preregistered, "n_boot": n_boot, "seed": seed,
                            "completions_available": completions is not None}
    if matched_verdicts is not None:
        head |= {"rule": "matched-dose, three outcomes, intention-to-treat (docs/statistics.md)",
                 "site": matched_banner(matched_verdicts), "verdicts": matched_verdicts, "alpha_sweep": sweep}
    else:
        head |= {**sweep, "rule": "intersection-union (no matched.parquet: run the match stage for the matched-dose "
                                  "verdict)"}
    if partial is not None:
        head["partial"] = {"pending": partial[0], "notice": partial[1]}
    (out / "verdict.json").write_text(json.dumps(head, indent=2, default=str) + "\n")

    # ---- charts (transforms -> builders)
    chart_specs: dict[str, ChartSpec] = {}

    def add(name: str, title: str, frame: pl.DataFrame | None, build: Callable[[pl.DataFrame], Any],
            why: str) -> None:
        chart_specs[name] = (ChartSpec(title, None, why) if frame is None or frame.is_empty()
                             else ChartSpec(title, build(frame)))

    add("dose_response", "Dose-response relative to noop", transforms.dose_frame(rel), charts.dose_response_chart,
        "no usable paired scores")
    add("per_prompt_heatmap", "Per-prompt heterogeneity", transforms.heatmap_frame(het, alphas),
        charts.heatmap_chart, "no cells at the decision alphas")
    add("forest", "Paired effects vs each control", transforms.forest_frame(paired_score, paired_hits, alphas),
        charts.forest_chart, "no paired comparisons at the decision alphas")
    add("hit_rates", "Completion hit rates", transforms.hits_frame(hits) if hits is not None else None,
        charts.hit_rate_chart, "no completions.parquet")
    if matched_verdicts is not None:
        add("pareto", "Score against side effect: dose curves and matched points",
            pareto_frame(cells, matched_verdicts), lambda f: pareto_chart(f, matched_verdicts),
            "no off-target KL in cells.parquet")
    add("injected_norm", "Target effect against injected norm",
        transforms.matched_norm_frame(cells, n_boot=min(n_boot, 2_000), seed=seed), charts.matched_norm_chart,
        "no activation method with a non-zero delta")

    sections = [reference_section(reference, alphas),
                *core_sections(alphas, cells, verdicts, summary, paired_score, paired_hits, hits, rel, pk, het,
                               secondary)]
    inputs = ReportInputs(run_dir=run.root, cells=cells, completions=completions,
                          decision_alphas=tuple(alphas), seed=seed, read_tables=_method_tables(run))
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

    across = ("none: each verdict is its own claim" if correction == "none"
              else f"Holm over the {len(method_pairs)} method · scaling verdicts")
    header = (f"Decision alphas (pre-declared): {', '.join(f'{a:g}' for a in alphas)}; controls: "
              f"{', '.join(controls)}. A metric is won when, against EVERY applicable control at every "
              f"decision alpha, the one-sided exact sign-flip p < {level:g}, the 95% CI lies above 0 and "
              f"the mean difference is positive (intersection-union test: no correction across controls); "
              f"correction across methods: {across}. Supported = logmass and edited-family completion "
              f"hits won; underpowered = too few usable prompts for any outcome to pass. "
              f"Primary analysis: fallback and gated prompts excluded. Bootstrap: {n_boot} resamples, seed {seed}.")
    if matched_verdicts is not None:
        header = "Exploratory dose-response view (alpha sweep, not the verdict). " + header
    notice = f"{partial[1]} " if partial is not None else ""
    page = Page(title=_title(config, run), header=header, verdicts=verdicts, sections=sections, charts=chart_specs,
                manifest=manifest, banner=notice + banner,
                matched=None if matched_verdicts is None else (
                    notice + matched_banner(matched_verdicts), decision_paragraph(decision, preregistered),
                    verdict_table(matched_verdicts)))
    if matched_verdicts is not None:
        warnings = [w for w in (partial[1] if partial is not None else None, survival_warning(cells)) if w]
        (out / "summary.md").write_text(summary_markdown(_title(config, run), matched_verdicts, decision,
                                                         preregistered, warnings))
        (out / "details.md").write_text(markdown(page))
    else:
        (out / "summary.md").write_text(markdown(page))
    (out / "report.html").write_text(html_page(page))
    return out


def _partial_notice(run: RunDir) -> tuple[list[str], str] | None:
    """The methods a partial run has not added yet (``pending.json``), and the line that says so."""
    if not run.pending.is_file():
        return None
    try:
        pending = dict(json.loads(run.pending.read_text()).get("pending", {}))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    builds = "; ".join(sorted(set(map(str, pending.values()))))
    return list(pending), (f"PARTIAL REPORT: {', '.join(pending)} not included yet (waiting for {builds}). The "
                           "report is rewritten when they finish; if the run was stopped, the same `steercmp run` "
                           "resumes it.")


def _seeds(config: Mapping[str, Any]) -> int:
    comp = config.get("completions") if isinstance(config.get("completions"), dict) else {}
    return int(comp.get("seeds", 5) or 5)


def _declared(config: Mapping[str, Any], alphas: Sequence[float], level: float, correction: str) -> dict[str, Any]:
    """The decision settings in force, and whether they are the pre-declared ones (config.yaml):
    a report run with other flags is an exploratory re-analysis, and says so."""
    declared = config.get("decision") if isinstance(config.get("decision"), dict) else {}
    min_effect = declared.get("min_effect", DEFAULT_MIN_EFFECT)
    settings = {"alphas": [float(a) for a in alphas], "level": level, "correction": correction,
                "min_effect": float(min_effect) if isinstance(min_effect, int | float) else DEFAULT_MIN_EFFECT,
                "max_kl": declared.get("max_kl", "auto"), "random_draws": declared.get("random_draws", DEFAULT_RANDOM_DRAWS)}
    same = (not declared or ([float(a) for a in declared.get("alphas", alphas)] == settings["alphas"]
                             and float(declared.get("level", level)) == level
                             and declared.get("correction", correction) == correction))
    return settings | {"preregistered": bool(same)}
