"""A float32 checkpoint steercmp built loads into bf16 from a bf16 copy made once beside it:
the same weights as the float32 load's cast, without the float32 file's pages at load time."""

import os

import torch

from steercmp.lm.dtype_copy import MARKER, dtype_matched_checkpoint
from steercmp.lm.load import load_base_model
from steercmp.testing import save_tiny_checkpoint


def _params(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def test_bf16_load_of_a_cached_fp32_checkpoint_uses_an_exact_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERCMP_CACHE", str(tmp_path / "cache"))
    ckpt = save_tiny_checkpoint(tmp_path / "cache" / "models" / "tiny")
    reference = {k: v.to(torch.bfloat16) for k, v in _params(load_base_model(str(ckpt), dtype="float32")).items()}
    lm = load_base_model(str(ckpt), dtype="bfloat16")
    copy = ckpt.with_name("tiny.bfloat16")
    assert (copy / MARKER).is_file() and (copy / "tokenizer.json").is_file()
    assert lm.path == str(ckpt)  # provenance names the checkpoint, not its copy
    got = _params(lm)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    # the second load reuses the copy; float32 and checkpoints outside the cache are never copied
    made = (copy / "model.safetensors").stat().st_mtime_ns
    assert dtype_matched_checkpoint(ckpt, torch.bfloat16) == copy
    assert (copy / "model.safetensors").stat().st_mtime_ns == made
    assert dtype_matched_checkpoint(str(ckpt), torch.float32) == str(ckpt)
    outside = save_tiny_checkpoint(tmp_path / "mine")
    assert dtype_matched_checkpoint(outside, torch.bfloat16) == outside
    assert not outside.with_name("mine.bfloat16").exists()
    assert dtype_matched_checkpoint("google/gemma-3-270m", torch.bfloat16) == "google/gemma-3-270m"


def test_a_rebuilt_checkpoint_gets_a_new_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERCMP_CACHE", str(tmp_path))
    ckpt = save_tiny_checkpoint(tmp_path / "models" / "tiny", seed=0)
    first = dtype_matched_checkpoint(ckpt, torch.bfloat16)
    save_tiny_checkpoint(ckpt, seed=1)  # rebuilt in place: other weights
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    again = load_base_model(str(ckpt), dtype="bfloat16")
    want = load_base_model(str(ckpt), dtype="float32").model.state_dict()
    assert first == ckpt.with_name("tiny.bfloat16")
    assert all(torch.equal(v, want[k].to(torch.bfloat16)) for k, v in again.model.state_dict().items())


def test_a_cache_that_cannot_take_the_copy_loads_the_float32_file(tmp_path, monkeypatch):
    from contextlib import contextmanager

    from steercmp.errors import ConfigError
    from steercmp.lm import dtype_copy

    @contextmanager
    def read_only(target, what, log=None):  # what build_lock raises for a folder it cannot write
        raise ConfigError(f"cache directory {str(target.parent)!r} is not writable", where="STEERCMP_CACHE")
        yield

    monkeypatch.setenv("STEERCMP_CACHE", str(tmp_path))
    monkeypatch.setattr(dtype_copy, "build_lock", read_only)
    ckpt = save_tiny_checkpoint(tmp_path / "models" / "tiny")
    assert dtype_matched_checkpoint(ckpt, torch.bfloat16) == ckpt
    assert load_base_model(str(ckpt), dtype="bfloat16").model.dtype == torch.bfloat16
    assert not ckpt.with_name("tiny.bfloat16").exists()
