"""dtype auto: chosen by a measured, cached probe; forced by STEERCMP_DTYPE; never assumed."""

import json
import types

import pytest
import torch

from steercmp.errors import ConfigError
from steercmp.lm import device
from steercmp.lm.load import parse_dtype


def test_probe_is_measured_cached_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERCMP_CACHE", str(tmp_path))
    monkeypatch.delenv(device.FORCE_ENV, raising=False)
    calls = []
    monkeypatch.setattr(device, "_time_matmul", lambda dtype, **_: calls.append(dtype) or
                        (1.0 if dtype == torch.float32 else 5.0))  # bf16 5x SLOWER: an AVX2-only CPU
    rec = device.probe_cpu()
    assert rec["choice"] == "float32" and rec["speedup"] == pytest.approx(0.2)
    assert device.fast_dtype("cpu") == "float32" and parse_dtype("auto") is torch.float32
    assert len(calls) == 2  # the second call read the cache
    cached = json.loads((tmp_path / "dtype-probe.json").read_text())
    assert cached["key"]["capability"] == torch.backends.cpu.get_cpu_capability()
    cached["key"]["torch"] = "0.0"  # another torch: the probe runs again
    (tmp_path / "dtype-probe.json").write_text(json.dumps(cached))
    monkeypatch.setattr(device, "_time_matmul", lambda dtype, **_: 1.0 if dtype == torch.float32 else 0.4)
    assert device.probe_cpu()["choice"] == "bfloat16"
    assert "probe on this CPU" in device.dtype_report("cpu")


@pytest.mark.parametrize(("bf16_seconds", "bf16_calls", "choice"),
                         [(0.05, 1, "float32"), (0.0002, 7, "bfloat16")])
def test_probe_stops_timing_a_bf16_far_slower_than_float32(tmp_path, monkeypatch, bf16_seconds,
                                                             bf16_calls, choice):
    """Where bf16 has no native support one call takes seconds: the probe stops at the first call
    10x slower than float32's best instead of timing all seven; a fast bf16 is timed in full.
    The matmuls and the clock are fakes, so the test does not depend on this machine's load."""
    monkeypatch.setenv("STEERCMP_CACHE", str(tmp_path))
    monkeypatch.delenv(device.FORCE_ENV, raising=False)
    calls = {torch.float32: 0, torch.bfloat16: 0}
    clock = [0.0]

    def fake_matmul(a, b):
        calls[a.dtype] += 1
        clock[0] += bf16_seconds if a.dtype == torch.bfloat16 else 0.001

    monkeypatch.setattr(device.torch, "matmul", fake_matmul)
    monkeypatch.setattr(device, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    rec = device.probe_cpu()
    assert calls == {torch.float32: 7, torch.bfloat16: bf16_calls}
    assert rec["choice"] == choice and rec["float32_seconds"] == pytest.approx(0.001)


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
