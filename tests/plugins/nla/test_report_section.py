"""The NLA plugin's report section (register_report_sections): fidelity and selection per prompt."""

import json

import polars as pl
import pytest

from steercmp.api import ReportInputs, SectionContent
from steercmp.plugin_manager import build_plugin_manager
from steercmp_plugins.nla.report_sections import (
    SECTION,
    fidelity_chart,
    fidelity_frame,
    selections_frame,
)


def selections() -> pl.DataFrame:
    return pl.DataFrame(dict(prompt_id=["a", "b", "c"], selection=["editable", "fallback", "dropped"],
                             sample=[0, 1, None], cosine=[0.99, 0.98, None], fve_nrm=[0.6, 0.4, None],
                             mse_nrm=[0.02, 0.04, None], delta_norm=[1.0, 2.0, None]))


def inputs(tables: dict[str, pl.DataFrame]) -> ReportInputs:
    return ReportInputs(run_dir=None, cells=pl.DataFrame(), completions=None, decision_alphas=(2.0,), seed=0,
                        read_tables=lambda name: tables if name == "selections" else {})


def test_section_is_registered_through_the_hook():
    ps = build_plugin_manager(builtins=("steercmp_plugins.nla",), entry_points=False)
    assert [s.name for s in ps.report_sections()] == ["nla_fidelity", "nla_panel"]


def test_fidelity_frame_and_chart():
    frame = fidelity_frame(selections_frame({"nla_text_edit": selections()}))
    assert set(frame["metric"].unique().to_list()) == {"cosine", "fve_nrm", "delta_norm"}
    spec = fidelity_chart(frame).to_dict()
    assert spec["spec"]["mark"]["type"] == "bar" and spec["spec"]["encoding"]["color"]["field"] == "selection"


def test_section_content_and_absence():
    content = SECTION.build(inputs({"nla_text_edit": selections()}))
    assert isinstance(content, SectionContent) and content.chart is not None
    (title, table), = content.tables
    assert title == "selections" and table["method"].unique().to_list() == ["nla_text_edit"]
    assert SECTION.build(inputs({})) is None


def test_panel_pairs_effects_per_prompt():
    from steercmp_plugins.nla.report_sections import PANEL, panel_frame

    rows = []
    for pid, fve, (noop, target, para, rt) in [("a", 0.6, (-1.0, 1.0, -0.5, -0.9)), ("b", 0.2, (0.0, 0.5, 0.7, 0.1))]:
        for cond, score, kl in [("noop", noop, 0.0), ("target_edit", target, 0.3), ("paraphrase_edit", para, 0.2),
                                ("round_trip", rt, 0.05)]:
            rows.append(dict(prompt_id=pid, method="nla_text_edit", condition=cond, alpha=2.0, scaling="raw",
                             score=score, kl_unsteered=kl, status="editable", meta=json.dumps({"fve_nrm": fve})))
    cells = pl.DataFrame(rows)
    df = panel_frame(cells, 2.0)
    a = df.filter(pl.col("prompt_id") == "a").row(0, named=True)
    assert a["target_effect"] == 2.0 and a["paraphrase_effect"] == 0.5 and a["round_trip_shift"] == pytest.approx(0.1)
    assert a["round_trip_kl"] == 0.05 and a["fve_nrm"] == 0.6
    content = PANEL.build(ReportInputs(run_dir=None, cells=cells, completions=None, decision_alphas=(2.0,), seed=0,
                                       read_tables=lambda name: {}))
    summary = content.tables[0][1]
    assert summary["target > paraphrase"].to_list() == ["1/2"]  # target beats paraphrase on prompt a only
    no_text_edit = cells.filter(pl.col("condition").is_in(["noop", "target_edit"]))
    assert PANEL.build(ReportInputs(run_dir=None, cells=no_text_edit, completions=None, decision_alphas=(2.0,),
                                    seed=0, read_tables=lambda name: {})) is None
