"""Safe loading and hygiene: safetensors only, no remote code unless asked, plugins only from the
allowed places, no credentials in artifacts or logs, and no hook left behind by an exception."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import steercmp.testing
from steercmp.config import Experiment
from steercmp.errors import ConfigError
from steercmp.lm.hooks import Injection, attached_hooks, capturing, injecting
from steercmp.lm.load import decoder_layers, load_base_model
from steercmp.plugin_manager import build_plugin_manager
from steercmp.testing import write_tiny_experiment as write_experiment
from steercmp.testing.running import TINY_BUILTINS as BUILTINS

ROOT = Path(__file__).resolve().parents[2]


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for folder in ("steercmp", "plugins"):
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                    found.append((f, node))
    return found


def test_torch_load_always_weights_only():
    for f, call in _calls("load"):
        if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch":
            kw = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, f


def test_no_hardcoded_remote_code_or_pickle_loading():
    for f, call in _calls("from_pretrained"):
        for k in call.keywords:
            if k.arg == "trust_remote_code":
                assert not (isinstance(k.value, ast.Constant) and k.value.value is True), f
            if k.arg == "use_safetensors":
                assert not (isinstance(k.value, ast.Constant) and k.value.value is False), f
    for f in list((ROOT / "steercmp").rglob("*.py")) + list((ROOT / "plugins").rglob("*.py")):
        if f.relative_to(ROOT).as_posix() in PICKLE_IPC:
            continue
        assert not re.search(r"^\s*import pickle|pickle\.load", f.read_text(), re.M), f


#: modules that unpickle only what their own process pair wrote into an anonymous pipe (never a
#: file, never a download): a build process's call arrives over its stdin from the run, and its
#: answer over a pipe the run made (a multiprocessing spawn does the same inside the library)
PICKLE_IPC = {"steercmp/lm/build_process.py"}


def test_pickle_is_read_only_from_pipes_in_the_ipc_module():
    text = (ROOT / "steercmp/lm/build_process.py").read_text()
    loads = re.findall(r"pickle\.loads?\(([^)]*)\)", text)
    assert loads and set(loads) <= {"sys.stdin.buffer", "data"}, loads
    assert not re.search(r"(?<![.\w])open\(|Path\(", text)  # no file is opened: only os.pipe() ends


def test_loader_uses_safetensors_and_remote_code_off_by_default(tiny_ckpt, monkeypatch):  # noqa: F811
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_base_model(str(tiny_ckpt), progress=False)
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    battery = steercmp.testing.tiny_battery()
    exp = Experiment.from_dict({"layer": 1, "battery": "b.yaml", "methods": ["x"]}, battery=battery)
    assert exp.model.trust_remote_code is False
    with pytest.raises(ConfigError, match="model.trust_remote_code"):
        Experiment.from_dict({"layer": 1, "battery": "b.yaml", "methods": ["x"],
                              "model": {"trust_remote_code": "false"}}, battery=battery)


def test_pickled_weights_are_refused(tiny_ckpt, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(str(tiny_ckpt / "model.safetensors")), d / "pytorch_model.bin")
    with pytest.raises(ConfigError):
        load_base_model(str(d), progress=False)


def test_plugins_only_from_allowed_places(tmp_path, monkeypatch):
    stray = tmp_path / "plugins"
    stray.mkdir()
    (stray / "evil.py").write_text("raise SystemExit('a stray plugin was imported')\n")
    monkeypatch.chdir(tmp_path)  # a plugins/ folder in the working directory is NOT loaded
    ps = build_plugin_manager(builtins=BUILTINS, entry_points=False)
    assert [o for _, o in ps.sources] == ["built-in", "built-in"]
    named = tmp_path / "named"
    named.mkdir()
    (named / "extra.py").write_text(
        "from steercmp.hookspecs import hookimpl\nfrom steercmp.api import Control\n"
        "class C(Control):\n    name = 'dir_control'\n    def derive(self, t, c, g):\n        return t\n"
        "@hookimpl\ndef register_controls(register):\n    register(C)\n")
    ps = build_plugin_manager(builtins=BUILTINS, entry_points=False, plugins_dir=named)
    assert ps.sources[-1] == (str(named / "extra.py"), "plugins dir")
    assert ps.controls["dir_control"].origin == "plugins dir"
    out = subprocess.run([sys.executable, "-m", "steercmp", "--plugins-dir", str(named), "plugins"],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    assert "dir_control" in out.stdout and f"{named / 'extra.py'}  (plugins dir)" in out.stdout
    assert "evil" not in out.stdout


def test_credentials_never_reach_artifacts_or_logs(tmp_path, tiny_ckpt, monkeypatch):  # noqa: F811
    secret = "hf_s3cretTOKENvalue0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-key-42")
    exp = write_experiment(tmp_path, tiny_ckpt)
    data = yaml.safe_load(exp.read_text())
    data["methods"] = [{"name": "unembed_direction", "options": {}}]
    data["description"] = f"token {secret} pasted by mistake"
    exp.write_text(yaml.safe_dump(data))
    logs: list[str] = []
    plugins = build_plugin_manager(builtins=BUILTINS, entry_points=False)
    from steercmp.run.runner import Runner

    Runner(Experiment.from_yaml(exp), plugins, tmp_path / "run", progress=False, log=logs.append).run(
        ("extract", "propose", "score", "completions", "report"))
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert secret.encode() not in blob and b"wandb-secret-key-42" not in blob, f
    assert not any(secret in line for line in logs)
    from steercmp.errors import SteercmpError

    assert secret not in SteercmpError(f"failed with {secret}").one_line()


# ---------------------------------------------------------------- hook hygiene
class Boom(Exception):
    pass


def _explode_at(model, layer: int):
    def hook(*_):
        raise Boom

    return decoder_layers(model)[layer].register_forward_hook(hook)


def test_exception_mid_forward_leaves_no_hook(tiny):
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    inj = Injection.build(torch.ones(1, 64), [1.0], [2], "raw")
    handle = _explode_at(tiny, 3)
    before = attached_hooks(tiny)
    with pytest.raises(Boom), injecting(tiny, 1, inj), capturing(tiny, 2):
        tiny(input_ids=ids)
    assert attached_hooks(tiny) == before  # only our own exploding hook remains
    handle.remove()
    assert attached_hooks(tiny) == 0


def test_exception_mid_generation_and_sweep_leaves_no_hook(tiny_lm, monkeypatch):
    from steercmp.score import sample as completions
    from steercmp.score import sweep
    from steercmp.score.forms import family_forms
    from steercmp.score.full_forward import ScoreRow

    calls = {"n": 0}
    real = completions.sample_tokens

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second decoding step
            raise Boom
        return real(*a, **k)

    monkeypatch.setattr(completions, "sample_tokens", flaky)
    inj = Injection.build(torch.ones(2, 64), [1.0, 2.0], [2, 2], "raw")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(Boom):
        completions.generate_rows(tiny_lm, 1, [2, 10, 11, 12], inj, gens, completions.Decoding(5, 1.0))
    assert attached_hooks(tiny_lm.model) == 0

    layers_before = list(decoder_layers(tiny_lm.model))
    plan = family_forms(tiny_lm.tokenizer, {"original": ["dream"], "edited": ["gleam"], "unrelated": ["stone"]})
    row = ScoreRow((2, 10, 11, 12), 3, plan, torch.ones(64), 1.0, 1, "raw")
    handle = _explode_at(tiny_lm.model, 3)
    with pytest.raises(Boom):
        sweep.score_rows_fast(tiny_lm, 1, [row])
    handle.remove()
    assert attached_hooks(tiny_lm.model) == 0
    assert list(decoder_layers(tiny_lm.model)) == layers_before  # skipped blocks restored


@pytest.mark.slow
def test_embedded_model_exception_mid_generation_leaves_no_hook(embedded_lm, monkeypatch):
    from steercmp.score import sample as completions

    def boom(*a, **k):
        raise Boom

    monkeypatch.setattr(completions, "sample_tokens", boom)
    # transformers 5 keeps its own output-capturing hooks once output_hidden_states was used,
    # so compare against what was attached before, not against zero
    before = attached_hooks(embedded_lm.model)
    d = embedded_lm.d_model
    inj = Injection.build(torch.ones(1, d), [1.0], [2], "norm_relative")
    ids = embedded_lm.tokenizer("Roses are red,\nviolets")["input_ids"]
    with pytest.raises(Boom):
        completions.generate_rows(embedded_lm, 6, ids, inj, [torch.Generator()], completions.Decoding(3, 1.0))
    assert attached_hooks(embedded_lm.model) == before
