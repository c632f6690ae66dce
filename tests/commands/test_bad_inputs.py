"""Bad inputs stop with ONE line naming the file, the field and the fix, exit 2, no traceback, and
leave an existing run directory byte-identical (validation) or keep every finished result
(faults while running: a plugin that raises, NaN/inf, zero-norm deltas).

Every case runs the real CLI (``steercmp.cli.main``, all built-in plugins) against a finished run
directory of a tiny Gemma 3 checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from steercmp.cli import main
from steercmp.testing import COUPLET_BATTERY as BATTERY
from steercmp.testing import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent


def tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def base_experiment(model_dir: Path) -> dict:
    return {"name": "tiny", "model": {"id": str(model_dir)}, "layer": 1, "battery": "battery.yaml",
            "alphas": [0, 2], "scalings": ["raw", "norm_relative"], "methods": ["unembed_direction"],
            "completions": {"seeds": 1, "alphas": [2], "max_new_tokens": 2}, "decision": {"alphas": [2]}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, a good experiment and a finished run directory made from it."""
    root = tmp_path_factory.mktemp("bad")
    words = [w for p in BATTERY["prompts"] for fam in p["families"].values() for w in fam]
    ckpt = save_tiny_checkpoint(root / "ckpt", words=words)
    (root / "battery.yaml").write_text(yaml.safe_dump(BATTERY))
    (root / "exp.yaml").write_text(yaml.safe_dump(base_experiment(ckpt)))
    run_dir = root / "run"
    assert main(["run", str(root / "exp.yaml"), "--out", str(run_dir), "--no-progress"]) == 0
    return {"root": root, "ckpt": ckpt, "run": run_dir}


def _battery(**prompt0) -> dict:
    bat = json.loads(json.dumps(BATTERY))
    bat["prompts"][0].update(prompt0)
    return bat


def _sae_dir(root: Path, hook: str, d_in: int) -> Path:
    d = root / f"sae-{hook}-{d_in}"
    d.mkdir(exist_ok=True)
    (d / "cfg.json").write_text(json.dumps({"hook_name": hook, "d_in": d_in, "d_sae": 32,
                                            "architecture": "standard"}))
    return d


def _pickle_ckpt(root: Path, ckpt: Path) -> Path:
    d = root / "pickled"
    if not d.exists():
        d.mkdir()
        for f in ckpt.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, d / f.name)
        torch.save(load_file(str(ckpt / "model.safetensors")), d / "pytorch_model.bin")
    return d


# (id, experiment overrides | callable(world) -> overrides, battery | None, needle naming the field)
CASES = [
    ("unknown_method", {"methods": ["no_such_method"]}, None, "exp.yaml: methods"),
    ("unknown_control", {"controls": ["noop", "nope"]}, None, "exp.yaml: controls"),
    ("layer_out_of_range", {"layer": 9}, None, "exp.yaml: layer"),
    ("layer_not_integer", {"layer": "two"}, None, "exp.yaml: layer"),
    ("negative_layer", {"layer": -1}, None, "exp.yaml: layer"),
    ("non_numeric_alpha", {"alphas": [0, "two"]}, None, "exp.yaml: alphas"),
    ("nan_alpha", {"alphas": [0, float("nan")]}, None, "exp.yaml: alphas"),
    ("unknown_scaling", {"scalings": ["sideways"]}, None, "exp.yaml: scalings"),
    ("decision_alpha_not_swept", {"decision": {"alphas": [3]}}, None, "exp.yaml: decision.alphas"),
    ("misspelled_key", {"alpha": [1]}, None, "exp.yaml: alpha"),
    ("decision_level_above_one", {"decision": {"alphas": [2], "level": 1.5}}, None, "exp.yaml: decision.level"),
    ("decision_level_zero", {"decision": {"alphas": [2], "level": 0}}, None, "exp.yaml: decision.level"),
    ("unknown_correction", {"decision": {"alphas": [2], "correction": "bonferroni"}}, None,
     "exp.yaml: decision.correction"),
    ("unknown_decision_key", {"decision": {"alphas": [2], "levels": 0.1}}, None, "exp.yaml: decision.levels"),
    ("min_effect_zero", {"decision": {"alphas": [2], "min_effect": 0}}, None, "exp.yaml: decision.min_effect"),
    ("min_effect_text", {"decision": {"alphas": [2], "min_effect": "big"}}, None, "exp.yaml: decision.min_effect"),
    ("max_kl_negative", {"decision": {"alphas": [2], "max_kl": -1}}, None, "exp.yaml: decision.max_kl"),
    ("max_kl_word", {"decision": {"alphas": [2], "max_kl": "patch"}}, None, "exp.yaml: decision.max_kl"),
    ("random_draws_zero", {"decision": {"alphas": [2], "random_draws": 0}}, None, "exp.yaml: decision.random_draws"),
    ("trust_remote_code_as_string", lambda w: {"model": {"id": str(w["ckpt"]), "trust_remote_code": "no"}},
     None, "exp.yaml: model.trust_remote_code"),
    ("unknown_dtype", lambda w: {"model": {"id": str(w["ckpt"]), "dtype": "float8"}}, None, "exp.yaml: model.dtype"),
    ("bad_method_option", {"methods": [{"name": "unembed_direction", "options": {"norm_fraction": -1}}]},
     None, "exp.yaml: methods.unembed_direction.options"),
    ("bad_control_option", {"control_options": {"wrong_position": {"offset": 0}}}, None,
     "exp.yaml: control_options.wrong_position"),
    ("zero_completion_seeds", {"completions": {"seeds": 0}}, None, "exp.yaml: completions.seeds"),
    ("missing_model_dir", {"model": {"id": "/nonexistent/ckpt"}}, None, "exp.yaml: model.id"),
    ("pickle_only_weights", lambda w: {"model": {"id": str(_pickle_ckpt(w["root"], w["ckpt"]))}}, None,
     "exp.yaml: model.id"),
    ("missing_battery_file", {"battery": "nope.yaml"}, None, "nope.yaml"),
    ("duplicate_prompt_ids", {}, _battery(id="night_light"), "battery.yaml: prompts[1].id"),
    ("empty_family", {}, _battery(families={"original": [], "edited": ["gleam"], "unrelated": ["stone"]}),
     "families.original"),
    ("missing_family", {}, _battery(families={"original": ["dream"], "edited": ["gleam"]}), "families.unrelated"),
    ("word_not_in_vocabulary", {}, _battery(families={"original": ["dream"], "edited": ["zebra"],
                                                      "unrelated": ["stone"]}), "prompt stream_dream.families.edited"),
    ("not_a_plain_word", {}, _battery(families={"original": ["dream"], "edited": ["two words"],
                                                "unrelated": ["stone"]}), "families.edited"),
    ("rule_matches_nothing", {}, _battery(inject="regex:zzz"), "prompt stream_dream.inject"),
    ("rule_matches_several", {}, _battery(inject="regex:a"), "prompt stream_dream.inject"),
    ("unknown_rule", {}, _battery(inject="middle"), ".inject"),
    ("token_rule_outside_prompt", {}, _battery(score="token:99"), "prompt stream_dream.score"),
    ("empty_prompt_text", {}, _battery(text="  "), ".text"),
    ("no_prompts", {}, {"name": "x", "prompts": []}, "battery.yaml: prompts"),
    ("sae_layer_mismatch", lambda w: {"methods": [{"name": "sae_features", "options": {
        "path": str(_sae_dir(w["root"], "model.layers.3", 64))}}]}, None, "reads layer 3"),
    ("sae_d_in_mismatch", lambda w: {"model": {"id": "embedded:gemma-3-270m"}, "layer": 12, "methods": [
        {"name": "sae_features", "options": {"path": str(_sae_dir(w["root"], "model.layers.12", 64))}}]},
     None, "d_in"),
    ("scaling_singular", {"scaling": ["raw"]}, None, "exp.yaml: scaling: "),
    ("unknown_battery_short_name", {"battery": "note9"}, None, "exp.yaml: battery: 'note9' is not a shipped battery"),
    ("missing_relative_battery", {"battery": "sub/nope.yaml"}, None,
     "(relative paths resolve against the experiment file's folder, "),
]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("steercmp: error: ") and "; fix: " in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_or_battery(case, world, tmp_path, capsys):
    _name, overrides, battery, needle = case
    if callable(overrides):
        overrides = overrides(world)
    exp = base_experiment(world["ckpt"])
    exp.update(overrides)
    exp["battery"] = exp["battery"] if exp["battery"] != "battery.yaml" else "battery.yaml"
    (tmp_path / "battery.yaml").write_text(yaml.safe_dump(battery or BATTERY))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    before = tree_hash(world["run"])
    capsys.readouterr()
    code = main(["run", str(tmp_path / "exp.yaml"), "--out", str(world["run"]), "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    assert needle in line, line
    assert tree_hash(world["run"]) == before


@pytest.mark.parametrize("text, needle", [
    ("name: x\nlayer: [1\n", "malformed YAML at line"),
    ("- just\n- a list\n", "must be a YAML mapping"),
])
def test_malformed_experiment_yaml(text, needle, world, tmp_path, capsys):
    (tmp_path / "exp.yaml").write_text(text)
    before = tree_hash(world["run"])
    code = main(["run", str(tmp_path / "exp.yaml"), "--out", str(world["run"]), "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and needle in line and "exp.yaml" in line
    assert tree_hash(world["run"]) == before


def test_malformed_battery_yaml(world, tmp_path, capsys):
    (tmp_path / "battery.yaml").write_text("prompts:\n  - id: a\n    text: 'unclosed\n")
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(base_experiment(world["ckpt"])))
    before = tree_hash(world["run"])
    code = main(["run", str(tmp_path / "exp.yaml"), "--out", str(world["run"]), "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "battery.yaml" in line and "malformed YAML" in line
    assert tree_hash(world["run"]) == before


def test_missing_experiment_file(world, capsys):
    before = tree_hash(world["run"])
    code = main(["run", "/nonexistent/exp.yaml", "--out", str(world["run"])])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "/nonexistent/exp.yaml" in line and "not found" in line
    assert tree_hash(world["run"]) == before


@pytest.mark.parametrize("out", ["under_a_file", "/proc/version/run"])
def test_unwritable_output_directory(out, world, capsys):
    target = world["root"] / "a_file" / "run" if out == "under_a_file" else Path(out)
    (world["root"] / "a_file").write_text("not a directory")
    code = main(["run", str(world["root"] / "exp.yaml"), "--out", str(target), "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and str(target) in line and "not writable" in line


@pytest.mark.parametrize("processes", ["9", "0"])
def test_processes_outside_the_battery(processes, world, capsys):
    before = tree_hash(world["run"])
    code = main(["run", str(world["root"] / "exp.yaml"), "--out", str(world["run"]), "--processes", processes])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and (f"--processes: --processes {processes} must lie between 1 and 1, the sampling groups of "
                           "the battery's 3 prompts (completions.prompt_group 4)") in line
    assert tree_hash(world["run"]) == before


def test_missing_plugins_dir(capsys):
    code = main(["--plugins-dir", "/nonexistent/plugins", "plugins"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "/nonexistent/plugins" in line


def test_nla_sidecar_disagrees_with_tokenizer(tmp_path, capsys):
    """An AV sidecar whose injection token id is not what its tokenizer produces (public loader
    and the ``steercmp nla explain`` command)."""
    from steercmp_plugins.nla.tiny_pair import write_pair

    av, _ar = write_pair(tmp_path, av_meta_overrides={"tokens.injection_token_id": 7})
    save_file({"vector": torch.ones(64)}, str(tmp_path / "v.safetensors"))
    capsys.readouterr()
    code = main(["nla", "explain", "--av", str(av), "--vector", str(tmp_path / "v.safetensors")])
    err = capsys.readouterr().err
    # transformers' own weight-loading bar is not ours; the error itself is one line
    line = _one_line("\n".join(ln for ln in err.splitlines() if "Loading weights" not in ln))
    assert code == 2 and "nla_meta.yaml: tokens.injection_token_id" in line


# ---------------------------------------------------------------- faults while running
PLUGIN = '''
import torch
from steercmp.api import PROPOSAL_FAMILIES, Method, Proposal
from steercmp.hookspecs import hookimpl


def _each(contexts, make):
    return [Proposal(prompt_id=c.prompt.id, family=f, delta=make(c)) for c in contexts for f in PROPOSAL_FAMILIES]


class Raiser(Method):
    name = "raiser"
    def propose(self, contexts, runtime):
        raise RuntimeError("kaboom from raiser")


class ZeroDelta(Method):
    name = "zero_delta"
    def propose(self, contexts, runtime):
        return _each(contexts, lambda c: torch.zeros(c.d_model))


class NanDelta(Method):
    name = "nan_delta"
    def propose(self, contexts, runtime):
        return _each(contexts, lambda c: torch.full((c.d_model,), float("nan")))


class HugeDelta(Method):
    name = "huge_delta"
    def propose(self, contexts, runtime):
        return _each(contexts, lambda c: torch.nn.functional.one_hot(torch.tensor(0), c.d_model).float() * 3e38)


@hookimpl
def register_methods(register):
    for cls in (Raiser, ZeroDelta, NanDelta, HugeDelta):
        register(cls)
'''


@pytest.mark.parametrize("method, needle", [
    ("raiser", "method 'raiser' raised while proposing: RuntimeError: kaboom from raiser"),
    ("zero_delta", "method 'zero_delta' proposed a zero-norm delta"),
    ("nan_delta", "method 'nan_delta' proposed a delta with NaN or inf"),
    ("huge_delta", "cells have NaN or inf logits"),
])
def test_faulty_method_keeps_other_results(method, needle, world, tmp_path, capsys):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "faulty.py").write_text(PLUGIN)
    run_dir = tmp_path / "run"
    shutil.copytree(world["run"], run_dir)
    exp = base_experiment(world["ckpt"])
    exp["methods"] = ["unembed_direction", method]
    if method == "huge_delta":  # random_delta cannot match an inf norm; leave it out
        exp["controls"] = ["noop", "wrong_position"]
    (tmp_path / "battery.yaml").write_text(yaml.safe_dump(BATTERY))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    capsys.readouterr()
    code = main(["--plugins-dir", str(plugins), "run", str(tmp_path / "exp.yaml"), "--out", str(run_dir),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("steercmp: error: ")]
    assert len(errors) == 1 and needle in errors[0] and "; fix: " in errors[0], err
    assert "exp.yaml: methods." in errors[0]
    ref = pl.read_parquet(world["run"] / "cells.parquet")
    cells = pl.read_parquet(run_dir / "cells.parquet")
    kept = cells.filter(pl.col("method") == "unembed_direction")
    if method != "huge_delta":
        assert kept.equals(ref)  # the finished method's units were reused, bytes and order alike
    else:  # other controls: recomputed, equal up to batch-composition rounding
        ref = ref.filter(pl.col("condition").is_in(kept["condition"].unique().to_list()))
        assert kept.height == ref.height
        assert (kept["score"] - ref["score"]).abs().max() < 1e-4
    if method == "huge_delta":  # NaN logits are kept visibly: status error, no score
        bad = cells.filter(pl.col("method") == "huge_delta", pl.col("status") == "error")
        assert bad.height >= 6 and bad["score"].is_null().all()


def test_nan_weights_stop_before_writing_activations(world, tmp_path, capsys):
    ckpt = tmp_path / "nan_ckpt"
    shutil.copytree(world["ckpt"], ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in weights if "layers.0.mlp.down_proj" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    exp = base_experiment(ckpt)
    (tmp_path / "battery.yaml").write_text(yaml.safe_dump(BATTERY))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    run_dir = tmp_path / "run"
    shutil.copytree(world["run"], run_dir)
    acts = (run_dir / "activations.safetensors").read_bytes()
    code = main(["run", str(tmp_path / "exp.yaml"), "--out", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("steercmp: error:")]
    assert code == 2 and len(line) == 1 and "NaN or inf activations" in line[0] and "model.id" in line[0]
    assert "Traceback" not in err
    assert (run_dir / "activations.safetensors").read_bytes() == acts
