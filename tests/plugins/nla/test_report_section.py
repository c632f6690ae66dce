"""The NLA plugin's report section (register_report_sections): fidelity and selection per prompt."""

import polars as pl

from steercmp.api import ReportInputs, SectionContent
from steercmp.plugin_manager import build_plugin_manager
from steercmp_plugins.nla.report import SECTION, fidelity_chart, fidelity_frame, selections_frame


def selections() -> pl.DataFrame:
    return pl.DataFrame(dict(prompt_id=["a", "b", "c"], selection=["editable", "fallback", "dropped"],
                             sample=[0, 1, None], cosine=[0.99, 0.98, None], fve_nrm=[0.6, 0.4, None],
                             mse_nrm=[0.02, 0.04, None], delta_norm=[1.0, 2.0, None]))


def inputs(tables: dict[str, pl.DataFrame]) -> ReportInputs:
    return ReportInputs(run_dir=None, cells=pl.DataFrame(), completions=None, decision_alphas=(2.0,), seed=0,
                        read_tables=lambda name: tables if name == "selections" else {})


def test_section_is_registered_through_the_hook():
    ps = build_plugin_manager(builtins=("steercmp_plugins.nla",), entry_points=False)
    assert [s.name for s in ps.report_sections()] == ["nla_fidelity"]


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
