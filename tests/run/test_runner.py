"""End to end on a tiny Gemma 3 checkpoint: extract -> propose -> score -> completions, then
the report on the finished run directory."""

import json

import polars as pl
import pytest

from steercmp.plugin_manager import build_plugin_manager
from steercmp.report import write_report
from steercmp.testing import run_experiment as run
from steercmp.testing import write_tiny_experiment as write_experiment
from steercmp.testing.running import TINY_BUILTINS


def test_end_to_end_cells_schema(tmp_path, tiny_ckpt):
    exp = write_experiment(tmp_path, tiny_ckpt)
    runner, cells = run(exp, tmp_path / "run")
    write_report(tmp_path / "run", plugins=build_plugin_manager(builtins=TINY_BUILTINS, entry_points=False))
    n = 3 * 1 * 5 * 3 * 2  # prompts x methods x live conditions x alphas x scalings
    # the default controls include the text-edit pair (paraphrase_edit, round_trip): not_applicable here
    assert cells.height == 3 * 1 * 7 * 3 * 2
    for col in ("prompt_id", "method", "condition", "alpha", "scaling", "position", "delta_norm",
                "logmass_edited", "logmass_original", "score", "kl_unsteered"):
        assert col in cells.columns
    na = cells.filter(pl.col("status") == "not_applicable")
    assert set(na["condition"]) == {"paraphrase_edit", "round_trip"} and na["score"].is_null().all()
    ok = cells.filter(pl.col("status") == "ok")
    assert ok.height == n and ok["score"].is_finite().all() and (ok["kl_unsteered"] >= 0).all()
    assert (cells["score"] - (cells["logmass_edited"] - cells["logmass_original"])).abs().max() < 1e-9
    # alpha 0 is the unsteered model for every condition; noop is identical at every alpha
    base = cells.filter((pl.col("alpha") == 0) & (pl.col("status") == "ok")).group_by("prompt_id").agg(
        pl.col("score").n_unique())
    assert base["score"].max() == 1
    noop = cells.filter(pl.col("condition") == "noop").group_by("prompt_id").agg(pl.col("score").n_unique())
    assert noop["score"].max() == 1
    wrong = cells.filter(pl.col("condition") == "wrong_position")
    assert (wrong["position"] == wrong["inject_pos"] - 1).all()
    rnd = cells.filter(pl.col("condition") == "random_delta").sort("prompt_id", "alpha", "scaling")
    tgt = cells.filter(pl.col("condition") == "target_edit").sort("prompt_id", "alpha", "scaling")
    assert (rnd["delta_norm"] - tgt["delta_norm"]).abs().max() < 1e-3
    run_dir = tmp_path / "run"
    for f in ("config.yaml", "activations.safetensors", "cells.parquet", "completions.parquet", "manifest.json"):
        assert (run_dir / f).exists(), f
    comp = pl.read_parquet(run_dir / "completions.parquet")
    # unsteered cells (alpha 0, noop) share one set of samples per method, prompt and seed
    shared = comp.filter((pl.col("alpha") == 0) | (pl.col("condition") == "noop"))
    assert shared.group_by("method", "prompt_id", "seed").agg(pl.col("text").n_unique())["text"].max() == 1
    live = comp.filter(pl.col("status") == "ok")
    assert live.height == 3 * 5 * 2 * 2 * 2  # prompts x conditions x alphas x scalings x seeds
    assert comp.filter(pl.col("status") == "not_applicable")["text"].is_null().all()
    for f in ("summary.parquet", "paired.parquet", "verdict.json", "summary.md", "report.html"):
        assert (run_dir / "report" / f).exists(), f
    verdicts = json.loads((run_dir / "report" / "verdict.json").read_text())
    assert {v["method"] for v in verdicts["verdicts"]} == {"unembed_direction"}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config_hash"] and manifest["packages"]["torch"].startswith("2.13.0")


def test_rerun_reuses_stages_and_is_byte_identical(tmp_path, tiny_ckpt):
    exp = write_experiment(tmp_path, tiny_ckpt)
    _, first = run(exp, tmp_path / "a")
    runner, second = run(exp, tmp_path / "a")
    assert {"extract", "score", "completions"} <= set(runner.reused)
    _, fresh = run(exp, tmp_path / "b")
    assert (tmp_path / "a" / "cells.parquet").read_bytes() == (tmp_path / "b" / "cells.parquet").read_bytes()
    assert (tmp_path / "a" / "completions.parquet").read_bytes() == (tmp_path / "b" / "completions.parquet").read_bytes()
    assert first.equals(second)


def test_single_steps_in_sequence(tmp_path, tiny_ckpt):
    exp = write_experiment(tmp_path, tiny_ckpt)
    out = tmp_path / "steps"
    run(exp, out, steps=("extract",))
    assert (out / "activations.safetensors").exists() and not (out / "cells.parquet").exists()
    run(exp, out, steps=("propose",))
    _, cells = run(exp, out, steps=("score",))
    assert cells.height == 126


def test_score_step_without_extract_is_a_clear_error(tmp_path, tiny_ckpt):
    from steercmp.errors import ConfigError

    exp = write_experiment(tmp_path, tiny_ckpt)
    with pytest.raises(ConfigError, match="run `--step extract` first"):
        run(exp, tmp_path / "empty", steps=("score",))


def test_failing_plugin_keeps_other_methods(tmp_path, tiny_ckpt):
    from steercmp.api import Method
    from steercmp.hookspecs import hookimpl

    class Broken(Method):
        name = "broken"

        def propose(self, contexts, runtime):
            raise RuntimeError("kaboom")

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Broken)

    exp = write_experiment(tmp_path, tiny_ckpt, methods=["unembed_direction", "broken"])
    runner, cells = run(exp, tmp_path / "r", steps=("extract", "propose", "score"), extra=[Plugin()])
    assert set(cells["method"]) == {"unembed_direction"}
    assert len(runner.failures) == 1 and "broken" in runner.failures[0].one_line()
    assert "kaboom" in runner.failures[0].one_line()


def test_completions_share_the_unsteered_baseline_and_sample_prompting_texts(tmp_path, tiny_ckpt):
    """Seeds are matched and the unsteered baseline is drawn once per prompt and seed, for every
    method; a prompting method's own text is sampled on its own context (it was once shared
    with noop by mistake)."""
    exp = write_experiment(tmp_path, tiny_ckpt, methods=["unembed_direction", "prompting"])
    run(exp, tmp_path / "r", builtins=(*TINY_BUILTINS, "steercmp_plugins.prompting"))
    comp = pl.read_parquet(tmp_path / "r" / "completions.parquet")
    base = comp.filter(((pl.col("condition") == "noop") | (pl.col("alpha") == 0)) & (pl.col("status") == "ok"))
    base = base.filter((pl.col("method") != "prompting") | (pl.col("condition") == "noop"))
    per = base.group_by("prompt_id", "seed").agg(pl.col("text").n_unique(), pl.col("method").n_unique())
    assert per["text"].max() == 1 and per["method"].min() == 2
    prompting = comp.filter(pl.col("method") == "prompting")
    joined = prompting.filter(pl.col("condition") == "target_edit").join(
        prompting.filter(pl.col("condition") == "noop"), on=["prompt_id", "alpha", "seed"])
    assert (joined["text"] != joined["text_right"]).any()


def test_a_control_that_declines_leaves_its_cells_dropped(tmp_path, tiny_ckpt):
    """A control whose derive returns a dropped proposal (no delta) on some prompt: that prompt's
    cells of the control are written ``dropped`` with no score; the other prompts score."""
    import attrs

    from steercmp.api import Control
    from steercmp.hookspecs import hookimpl

    class Declines(Control):
        name = "declines_on_night"

        def derive(self, target, context, generator):
            if context.prompt.id == "night_light":
                return attrs.evolve(target, delta=None, status="dropped")
            return attrs.evolve(target, delta=-target.delta)

    class Plugin:
        @hookimpl
        def register_controls(self, register):
            register(Declines)

    exp = write_experiment(tmp_path, tiny_ckpt, controls=["noop", "declines_on_night"])
    _, cells = run(exp, tmp_path / "r", steps=("extract", "propose", "score"), extra=[Plugin()])
    mine = cells.filter(pl.col("condition") == "declines_on_night")
    night = mine.filter(pl.col("prompt_id") == "night_light")
    assert night.height > 0 and set(night["status"]) == {"dropped"} and night["score"].null_count() == night.height
    rest = mine.filter(pl.col("prompt_id") != "night_light")
    assert rest.height > 0 and rest["score"].null_count() == 0


def test_each_prompt_is_tokenized_once_per_run(tmp_path, tiny_ckpt, monkeypatch):
    """The preflight tokenizes every battery prompt once and extraction reuses it; a prompting
    method's text is tokenized by the proposal check and once more for all its cells (not once
    per alpha and scaling)."""
    from collections import Counter

    import steercmp.lm.capture
    import steercmp.lm.prompts
    import steercmp.run.cells
    import steercmp.run.proposals

    calls: Counter = Counter()
    real = steercmp.lm.prompts.tokenize_prompt

    def counting(tokenizer, prompt, chat_template=False, text=None, **kw):
        calls[(prompt.id, text)] += 1
        return real(tokenizer, prompt, chat_template, text, **kw)

    for module in (steercmp.lm.prompts, steercmp.lm.capture, steercmp.run.cells, steercmp.run.proposals):
        monkeypatch.setattr(module, "tokenize_prompt", counting)
    exp = write_experiment(tmp_path, tiny_ckpt, methods=["unembed_direction", "prompting"])
    run(exp, tmp_path / "r", builtins=(*TINY_BUILTINS, "steercmp_plugins.prompting"))
    prompts = {pid for pid, _ in calls}
    assert len(prompts) == 3 and all(calls[(pid, None)] == 1 for pid in prompts), calls
    texts = [key for key in calls if key[1] is not None]
    # each text: the proposal check, then once for its 3 alphas x 2 scalings of cells
    assert len(texts) >= 3 and all(calls[key] <= 2 for key in texts), calls
