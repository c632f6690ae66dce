"""NLA checkpoints are read strictly: scales are never assumed, corrupted weights are refused.

Each case goes through `steercmp nla explain|reconstruct` and must end in exit 2 with one line
naming the file and the problem."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from steercmp.cli import main
from steercmp_plugins.nla.tiny_pair import DELETE, write_pair


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(err) == 1, err
    assert err[0].startswith("steercmp: error: ") and "Traceback" not in err[0]
    return err[0]


def _vector(tmp_path, capsys, d=64):
    capsys.readouterr()  # what writing the fixture printed is not ours
    path = tmp_path / "v.safetensors"
    save_file({"vector": torch.ones(d)}, str(path))
    return str(path)


def test_av_sidecar_without_injection_scale_is_refused(tmp_path, capsys):
    av, _ar = write_pair(tmp_path, av_meta_overrides={"extraction.injection_scale": DELETE})
    assert main(["nla", "explain", "--av", str(av), "--vector", _vector(tmp_path, capsys)]) == 2
    line = _one_line(capsys)
    assert f"{av / 'nla_meta.yaml'}: extraction.injection_scale" in line and "missing" in line


def test_nan_value_head_is_refused(tmp_path, capsys):
    _av, ar = write_pair(tmp_path)
    head = load_file(str(ar / "value_head.safetensors"))
    head["weight"][3, 5] = float("nan")
    save_file(head, str(ar / "value_head.safetensors"))
    capsys.readouterr()
    assert main(["nla", "reconstruct", "--ar", str(ar), "--text", "the stream"]) == 2
    line = _one_line(capsys)
    assert "value_head.safetensors" in line and "NaN or Inf" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_av_weights_are_refused(tmp_path, capsys, value):
    av, _ar = write_pair(tmp_path)
    weights = load_file(str(av / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] = value
    save_file(weights, str(av / "model.safetensors"), metadata={"format": "pt"})
    assert main(["nla", "explain", "--av", str(av), "--vector", _vector(tmp_path, capsys)]) == 2
    line = _one_line(capsys)
    assert str(av) in line and "AV weight" in line and "NaN or Inf" in line


def test_the_finite_check_reads_every_slice_of_every_tensor(monkeypatch):
    """Checked a slice at a time: a NaN in the last element of a tensor's last slice, and in a
    tensor tied to another, is still found."""
    import torch

    from steercmp.api import ConfigError
    from steercmp_plugins.nla import checkpoint

    monkeypatch.setattr(checkpoint, "FINITE_CHECK_CHUNK", 7)
    module = torch.nn.Sequential(torch.nn.Embedding(10, 5), torch.nn.Linear(5, 10, bias=False))
    module[1].weight = module[0].weight  # tied
    checkpoint.check_finite_weights(module, "AV", "here")
    with torch.no_grad():
        module[0].weight[-1, -1] = float("inf")
    with pytest.raises(ConfigError, match="AV weight '0.weight' contains NaN or Inf"):
        checkpoint.check_finite_weights(module, "AV", "here")
