"""dtype auto: chosen by a measured, cached probe; forced by STEERCMP_DTYPE; never assumed."""

import json

import pytest
import torch

from steercmp.errors import ConfigError
from steercmp.lm import device
from steercmp.lm.load import parse_dtype


def test_probe_is_measured_cached_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERCMP_CACHE", str(tmp_path))
    monkeypatch.delenv(device.FORCE_ENV, raising=False)
    calls = []
    monkeypatch.setattr(device, "_time_matmul", lambda dtype, reps=6: calls.append(dtype) or
                        (1.0 if dtype == torch.float32 else 5.0))  # bf16 5x SLOWER: an AVX2-only CPU
    rec = device.probe_cpu()
    assert rec["choice"] == "float32" and rec["speedup"] == pytest.approx(0.2)
    assert device.fast_dtype("cpu") == "float32" and parse_dtype("auto") is torch.float32
    assert len(calls) == 2  # the second call read the cache
    cached = json.loads((tmp_path / "dtype-probe.json").read_text())
    assert cached["key"]["capability"] == torch.backends.cpu.get_cpu_capability()
    cached["key"]["torch"] = "0.0"  # another torch: the probe runs again
    (tmp_path / "dtype-probe.json").write_text(json.dumps(cached))
    monkeypatch.setattr(device, "_time_matmul", lambda dtype, reps=6: 1.0 if dtype == torch.float32 else 0.4)
    assert device.probe_cpu()["choice"] == "bfloat16"
    assert "probe on this CPU" in device.dtype_report("cpu")


def test_forced_dtype(monkeypatch):
    monkeypatch.setenv(device.FORCE_ENV, "float32")
    assert device.fast_dtype("cpu") == "float32" and "forced" in device.dtype_report("cpu")
    monkeypatch.setenv(device.FORCE_ENV, "float8")
    with pytest.raises(ConfigError, match="STEERCMP_DTYPE"):
        device.fast_dtype("cpu")


def test_loaded_models_read_out_without_copying_the_weight():
    """The readout gets a view with fresh strides, so a [1, 1, d] slice folds into one mm."""
    from steercmp.lm.hooks import contiguous_readout
    from steercmp.testing import tiny_model

    model = tiny_model()
    contiguous_readout(model)
    contiguous_readout(model)  # idempotent
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    x = torch.randn(1, 5, 64)[:, -1:, :]
    with torch.profiler.profile() as prof:
        model.get_output_embeddings()(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mm" in ops and "aten::bmm" not in ops
