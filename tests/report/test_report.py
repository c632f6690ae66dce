"""Report tests: chart builders via ``to_dict()`` on synthetic schema-shaped frames, and one
slower test that writes a full report for a synthetic run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from steercmp import stats
from steercmp.api import ReportSection, SectionContent
from steercmp.errors import ConfigError, PluginError
from steercmp.hookspecs import hookimpl
from steercmp.plugin_manager import build_plugin_manager
from steercmp.report import charts, transforms, write_report

PROMPTS = ["bird_word", "fire_desire", "hill_still", "night_light", "rain_pane", "shore_more",
           "snow_glow", "stream_dream"]
CONDITIONS = ["target_edit", "noop", "unrelated_edit", "random_delta", "wrong_position"]
ALPHAS = [-2.0, 0.0, 2.0, 4.0, 8.0]
METHODS = ["nla_text_edit", "sae_features"]
N_BOOT = 2000


def synthetic_cells(seed: int = 0) -> pl.DataFrame:
    """cells.parquet rows per docs/schemas.md with a strong target effect at alpha > 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in METHODS:
        for scaling in ["raw", "norm_relative"]:
            for p_i, p in enumerate(PROMPTS):
                sel = "editable" if p_i % 2 == 0 else "fallback"
                dropped = m == "nla_text_edit" and p == "snow_glow"
                for c in CONDITIONS:
                    for a in ALPHAS:
                        effect = (3.0 + 0.5 * a) if (c == "target_edit" and a > 0) else 0.0
                        base = -2.0 + 0.3 * p_i
                        score = None if dropped else float(base + effect + rng.normal(0, 0.5))
                        status = ("dropped" if dropped else (sel if m == "nla_text_edit"
                                                             and c == "target_edit" else "ok"))
                        rows.append(dict(
                            prompt_id=p, method=m, condition=c, alpha=a, scaling=scaling,
                            position=5, inject_pos=5 if c != "wrong_position" else 4, score_pos=9,
                            delta_norm=float(1.5 if m == "nla_text_edit" else 0.8),
                            logmass_edited=None if score is None else score - 5.0,
                            logmass_original=-5.0, logmass_unrelated=-7.0, score=score,
                            status=status, meta="{}"))
    return pl.DataFrame(rows)


def synthetic_completions(seed: int = 0, n_seeds: int = 5) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for m in METHODS:
        for p in PROMPTS:
            for c in CONDITIONS:
                for a in [0.0, 2.0, 4.0]:
                    for s in range(n_seeds):
                        p_edit = 0.9 if (c == "target_edit" and a > 0) else 0.1
                        hit_e = bool(rng.random() < p_edit)
                        rows.append(dict(
                            prompt_id=p, method=m, condition=c, alpha=a, scaling="raw", seed=s,
                            text="x\ny", line="x", hit_original=bool(rng.random() < 0.5),
                            hit_edited=hit_e, hit_unrelated=bool(rng.random() < 0.05),
                            status="ok"))
    return pl.DataFrame(rows)


def synthetic_selections() -> pl.DataFrame:
    return pl.DataFrame(dict(
        prompt_id=PROMPTS,
        selection=["editable", "fallback"] * 3 + ["dropped", "fallback"],
        sample=[0, 1] * 4, explanation=["e"] * 8, edited_text=["e2"] * 8,
        unrelated_text=["e3"] * 8, fve_nrm=np.linspace(0.9, 0.98, 8).tolist(),
        mse_nrm=np.linspace(0.1, 0.02, 8).tolist(), cosine=np.linspace(0.98, 0.995, 8).tolist(),
        delta_norm=np.linspace(1.0, 2.0, 8).tolist(),
        unrelated_delta_norm=np.linspace(1.1, 2.1, 8).tolist()))


def make_run_dir(root: Path, *, completions: bool = True, config: bool = True,
                 manifest: bool = True, selections: bool = True) -> Path:
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    synthetic_cells().write_parquet(run / "cells.parquet")
    if completions:
        synthetic_completions().write_parquet(run / "completions.parquet")
    if config:
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": 7, "decision": {"alphas": [2, 4]}}))
    if manifest:
        (run / "manifest.json").write_text(json.dumps({"git": "abc123", "model": "tiny"}))
    if selections:
        (run / "methods" / "nla_text_edit").mkdir(parents=True, exist_ok=True)
        synthetic_selections().write_parquet(run / "methods" / "nla_text_edit" / "selections.parquet")
    return run


@pytest.fixture(scope="module")
def computed():
    cells = synthetic_cells()
    comps = synthetic_completions()
    summary = stats.summarize(cells, n_boot=N_BOOT)
    return dict(
        cells=cells, summary=summary,
        paired=stats.paired(cells, test=stats.PairedTest(n_boot=N_BOOT)),
        paired_hits=stats.paired_hits(comps, test=stats.PairedTest(n_boot=N_BOOT)),
        hits=stats.hit_rates(comps, n_boot=N_BOOT),
        het=stats.heterogeneity(cells),
        rel=stats.relative_to_noop(cells, test=stats.PairedTest(n_boot=N_BOOT)),
    )


def _mark_types(spec: dict) -> set[str]:
    found = set()

    def walk(node):  # type: ignore[no-untyped-def]
        if isinstance(node, dict):
            mark = node.get("mark")
            if isinstance(mark, str):
                found.add(mark)
            elif isinstance(mark, dict):
                found.add(mark["type"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return found


def _data_rows(spec: dict) -> int:
    return sum(len(v) for v in spec.get("datasets", {}).values())


def test_dose_response_chart_is_relative_to_noop(computed):
    df = transforms.dose_frame(computed["rel"])
    assert df.height == computed["rel"].filter(pl.col("mean_diff").is_not_null()).height  # one row per group
    assert "noop" not in df["condition"].to_list()  # noop is the zero line
    spec = charts.dose_response_chart(df).to_dict()
    assert spec["facet"]["field"] == "panel" and spec["columns"] == 3
    assert spec["resolve"]["scale"]["y"] == "independent"  # one method's +-700 must not flatten the others
    assert {"area", "line", "rule"} <= _mark_types(spec)
    assert _data_rows(spec) == df.height
    # the synthetic effect is 3 + 0.5 alpha above noop at alpha > 0 and none at alpha <= 0
    at4 = df.filter((pl.col("condition") == "target_edit") & (pl.col("alpha") == 4.0))["mean"]
    at0 = df.filter((pl.col("condition") == "target_edit") & (pl.col("alpha") == 0.0))["mean"]
    assert (at4 - 5.0).abs().max() < 1.2 and at0.abs().max() < 1.2  # noise: sd 0.7 per paired prompt, n 3-8


def test_heatmap_chart(computed):
    df = transforms.heatmap_frame(computed["het"], [2.0, 4.0])
    assert set(df["alpha"].unique().to_list()) == {2.0, 4.0}
    het = computed["het"]
    one = het.filter((pl.col("method") == "sae_features") & (pl.col("scaling") == "raw") & (pl.col("alpha") == 2.0)
                     & (pl.col("prompt_id") == "bird_word"))
    score = dict(zip(one["condition"].to_list(), one["score"].to_list(), strict=True))
    got = df.filter((pl.col("panel") == "sae_features · raw") & (pl.col("alpha") == 2.0)
                    & (pl.col("prompt_id") == "bird_word") & (pl.col("condition") == "target_edit"))["effect"][0]
    assert got == pytest.approx(score["target_edit"] - score["noop"])  # paired: minus the prompt's own noop
    assert df.filter(pl.col("prompt_id") == "bird_word")["prompt"].str.contains(r"\[").all()
    spec = charts.heatmap_chart(df).to_dict()
    assert {"rect", "text"} <= _mark_types(spec)
    assert len(spec["vconcat"]) == 4  # one row of alpha facets per method · scaling


def test_forest_chart(computed):
    df = transforms.forest_frame(computed["paired"], computed["paired_hits"], [2.0, 4.0])
    assert set(df["metric"].unique().to_list()) == {"logmass score", "edited-family hit rate"}
    assert df.filter(pl.col("metric") == "logmass score")["wins"].any()
    spec = charts.forest_chart(df).to_dict()
    assert spec["resolve"]["scale"]["x"] == "independent"
    assert {"rule", "point"} <= _mark_types(spec)


def test_hit_rate_chart(computed):
    df = transforms.hits_frame(computed["hits"])
    spec = charts.hit_rate_chart(df).to_dict()
    assert {"bar", "rule"} <= _mark_types(spec)
    assert _data_rows(spec) == df.height


def test_matched_norm_chart(computed):
    df = transforms.matched_norm_frame(computed["cells"], n_boot=500)
    assert set(df["method"].unique().to_list()) == set(METHODS)
    assert (df["scaling"] == "raw").all()
    row = df.filter((pl.col("method") == "nla_text_edit") & (pl.col("alpha") == -2.0)).row(0, named=True)
    assert row["injected_norm"] == pytest.approx(3.0)
    spec = charts.matched_norm_chart(df).to_dict()
    assert spec["layer"][1]["encoding"]["x"]["field"] == "injected_norm"


def test_write_report_full(tmp_path):
    run = make_run_dir(tmp_path)
    out = write_report(run, n_boot=N_BOOT)
    assert out == run / "report"
    for name in ["summary.parquet", "paired.parquet", "verdict.json", "summary.md",
                 "report.html", "dose_response.png", "per_prompt_heatmap.png", "forest.png",
                 "hit_rates.png", "nla_fidelity.png", "injected_norm.png",
                 "paired_completions.parquet", "hit_rates.parquet"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["decision_alphas"] == [2.0, 4.0] and verdict["seed"] == 7
    by = {(v["method"], v["scaling"]): v for v in verdict["verdicts"]}
    assert by[("sae_features", "raw")]["verdict"] == stats.SUPPORTED
    # completions exist only for raw scaling: norm_relative can at best shift probability
    assert by[("sae_features", "norm_relative")]["verdict"] == stats.SHIFT_ONLY
    html = (out / "report.html").read_text()
    assert "cdn" not in html.lower() and "vegaEmbed" in html
    assert html.index("Verdicts") < html.index("Dose-response")
    md = (out / "summary.md").read_text()
    assert md.index("## Verdicts") < md.index("## Logmass score at the decision alphas")
    summary = pl.read_parquet(out / "summary.parquet")
    assert {"method", "condition", "alpha", "n", "mean", "median", "n_positive", "ci_low",
            "ci_high"} <= set(summary.columns)


def test_write_report_minimal_inputs(tmp_path):
    """Only cells.parquet and explicit alphas: optional sections say 'not available'."""
    run = make_run_dir(tmp_path, completions=False, config=False, manifest=False,
                       selections=False)
    cells = synthetic_cells().filter(pl.col("method") == "sae_features")
    cells.write_parquet(run / "cells.parquet")
    out = write_report(run, decision_alphas=[2.0], n_boot=200, out_dir=tmp_path / "rep")
    md = (out / "summary.md").read_text()
    assert "not available" in md
    assert not (out / "hit_rates.png").exists() and not (out / "nla_fidelity.png").exists()
    verdict = json.loads((out / "verdict.json").read_text())
    assert {v["verdict"] for v in verdict["verdicts"]} == {stats.SHIFT_ONLY}


def test_write_report_needs_decision_alphas(tmp_path):
    run = make_run_dir(tmp_path, config=False)
    with pytest.raises(ConfigError) as err:
        write_report(run, n_boot=100)
    msg = str(err.value)
    assert "decision" in msg and "fix:" in msg and "\n" not in msg


def test_write_report_needs_cells(tmp_path):
    with pytest.raises(ConfigError):
        write_report(tmp_path, decision_alphas=[2.0])


class SectionPlugin:
    """A plugin that adds one report section (the register_report_sections hook)."""

    def __init__(self, section):
        self.section = section

    @hookimpl
    def register_report_sections(self, register):
        register(self.section)


def _plugins(*extra):
    return build_plugin_manager(builtins=(), entry_points=False, extra=list(extra))


def test_plugin_report_section_is_rendered(tmp_path):
    import altair as alt

    def build(inputs):
        df = inputs.cells.group_by("method").agg(pl.col("score").mean()).sort("method")
        return SectionContent(chart=alt.Chart(df).mark_bar().encode(x="method:N", y="score:Q"),
                              tables=[("mean score", df)], note="a plugin's own panel")

    section = ReportSection(name="plugin_panel", title="A plugin panel", build=build)
    out = write_report(make_run_dir(tmp_path), n_boot=200, plugins=_plugins(SectionPlugin(section)))
    md = (out / "summary.md").read_text()
    assert "## A plugin panel" in md and "a plugin's own panel" in md and "### mean score" in md
    assert (out / "plugin_panel.png").stat().st_size > 0
    assert "chart-plugin_panel" in (out / "report.html").read_text()


def test_plugin_report_section_errors(tmp_path):
    run = make_run_dir(tmp_path)
    with pytest.raises(PluginError, match="not a steercmp.api.ReportSection"):
        write_report(run, n_boot=200, plugins=_plugins(SectionPlugin("not a section")))
    clash = ReportSection(name="forest", title="x", build=lambda inputs: None)
    with pytest.raises(PluginError, match="clashes with a core chart"):
        write_report(run, n_boot=200, plugins=_plugins(SectionPlugin(clash)))
    absent = ReportSection(name="quiet", title="Quiet", build=lambda inputs: None, missing="nothing here")
    out = write_report(run, n_boot=200, plugins=_plugins(SectionPlugin(absent)))
    assert "Chart: not available (nothing here)" in (out / "summary.md").read_text()


def test_report_title_is_the_experiment_name(tmp_path):
    """config.yaml's name titles the report; without one, the run directory's name does."""
    run = make_run_dir(tmp_path, completions=False, manifest=False, selections=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "note8 sweep", "decision": {"alphas": [2]}}))
    out = write_report(run, n_boot=200, plugins=_plugins())
    assert (out / "summary.md").read_text().startswith("# steercmp report: note8 sweep\n")
    assert "<title>steercmp report: note8 sweep</title>" in (out / "report.html").read_text()
    (run / "config.yaml").write_text(yaml.safe_dump({"decision": {"alphas": [2]}}))
    out = write_report(run, n_boot=200, plugins=_plugins())
    assert (out / "summary.md").read_text().startswith(f"# steercmp report: {run.name}\n")


def test_write_report_checks_cells_before_writing(tmp_path):
    run = make_run_dir(tmp_path, completions=False, selections=False)
    synthetic_cells().drop("status").write_parquet(run / "cells.parquet")
    with pytest.raises(ConfigError) as err:
        write_report(run, n_boot=200, plugins=_plugins())
    line = err.value.one_line()
    assert "cells.parquet has no column 'status'" in line and "docs/schemas.md (cells.parquet)" in line
    assert "\n" not in line and not (run / "report").exists()
