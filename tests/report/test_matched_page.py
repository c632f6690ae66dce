"""The first screen's pieces on hand-made inputs."""

import polars as pl

from steercmp.report.summary_page import survival_warning, verdict_table
from steercmp.stats.analysis import matched_banner as banner


def test_survival_warning_names_the_cells_that_lost_their_delta():
    cells = pl.DataFrame({"method": ["a", "b", "c"], "prompt_id": ["p", "q", "r"],
                          "delta_survival": [1.0, 0.42, None]})
    line = survival_warning(cells)
    assert line is not None and line.startswith("1 of 3 cells") and "0.420" in line and "b on q" in line
    assert survival_warning(cells.filter(pl.col("method") != "b")) is None
    assert survival_warning(cells.drop("delta_survival")) is None


def _v(method, verdict, role=None, statuses=None, mean=1.0):
    return {"method": method, "verdict": verdict, "role": role, "explanation": "x",
            "statuses": statuses or {"matched": 3}, "itt": {"score_vs_noop": {"mean": mean, "ci_low": 0.1,
                                                                              "ci_high": 2.0}},
            "dose_matched": True, "ratio_median": 0.1, "n_itt": 3, "n_selected": 3}


def test_the_banner_speaks_about_the_site_only_from_methods_that_inject():
    pc = _v("patch", "no effect", role="positive_control", statuses={"fixed": 3})
    prompt_only = _v("prompting", "causal claim supported", statuses={"not_dose_matched": 3})
    assert banner([pc, prompt_only]).startswith("Nothing that injects at this site wins")
    assert "injecting methods do (diffmean)" in banner([pc, prompt_only, _v("diffmean", "causal claim supported")])


def test_share_of_the_positive_control_is_at_matched_kl():
    head, rows = verdict_table([_v("patch", "x", role="positive_control", statuses={"fixed": 3}, mean=2.0),
                                _v("m", "y", mean=1.0)])
    assert rows[1][head.index("share of PC")] == "50%" and rows[0][head.index("share of PC")] == ""
