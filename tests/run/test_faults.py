"""Faults around the run directory and the build cache end in one line, a wait or a rebuild:
never two writers in one run directory, never a half-written cache reused."""

from __future__ import annotations

import errno
import json
import threading
import time

import pytest
from filelock import FileLock

from steercmp.errors import ConfigError
from steercmp.paths import build_lock, sole_writer
from steercmp.testing import run_experiment, write_tiny_experiment


def test_a_second_writer_of_a_run_directory_is_refused(tmp_path, tiny_ckpt):
    exp = write_tiny_experiment(tmp_path, tiny_ckpt)
    run = tmp_path / "run"
    run.mkdir()
    other = FileLock(str(run / ".steercmp.lock"))  # another process's hold, as flock sees it
    other.acquire()
    try:
        with pytest.raises(ConfigError) as info:
            run_experiment(exp, run)
        line = info.value.one_line()
        assert "another steercmp process is writing run directory" in line and "choose another --out" in line
        assert sorted(p.name for p in run.iterdir()) == [".steercmp.lock"]  # nothing written
    finally:
        other.release()
    runner, cells = run_experiment(exp, run)  # free again: the run goes through
    assert cells is not None and not runner.failures


def test_sole_writer_releases_on_error(tmp_path):
    with pytest.raises(RuntimeError), sole_writer(tmp_path, where="--out"):
        raise RuntimeError("boom")
    with sole_writer(tmp_path, where="--out"):
        pass


def test_a_second_builder_waits_then_finds_it_built(tmp_path):
    target = tmp_path / "cache" / "thing"
    events: list[str] = []

    def first() -> None:
        with build_lock(target, "a thing"):
            events.append("first builds")
            time.sleep(0.5)
            target.mkdir(parents=True)
            events.append("first done")

    t = threading.Thread(target=first)
    t.start()
    while not events:
        time.sleep(0.01)
    with build_lock(target, "a thing", log=events.append):
        events.append(f"second sees built={target.exists()}")
    t.join()
    assert events[0] == "first builds" and events[1].startswith("steercmp: waiting for another process")
    assert events[-2:] == ["first done", "second sees built=True"]


def test_a_full_disk_during_a_build_is_one_line_and_leaves_no_half_build(tmp_path):
    target = tmp_path / "cache" / "thing"
    tmp = target.with_name("thing.tmp")
    with pytest.raises(ConfigError) as info, build_lock(target, "a thing"):
        tmp.mkdir(parents=True)
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    line = info.value.one_line()
    assert "the disk filled while building a thing" in line and "STEERCMP_CACHE" in line and "\n" not in line
    assert not tmp.exists() and not target.exists()


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(ConfigError) as info, build_lock(blocker / "thing", "a thing"):
        pass
    assert "cache directory" in info.value.one_line() and "is a file" in info.value.one_line()


def test_a_killed_mini_build_is_never_reused(tmp_path, monkeypatch):
    from steercmp_plugins.nla.mini import is_built, mini_dir

    monkeypatch.setenv("STEERCMP_CACHE", str(tmp_path))
    root = mini_dir("last")
    (root / "av").mkdir(parents=True)
    (root / "av" / "nla_meta.yaml").write_text("half")  # a build killed before its quality.json
    assert not is_built(root, "last")
    (root / "ar").mkdir()
    for f in ("ar/nla_meta.yaml", "ar/value_head.safetensors"):
        (root / f).write_text("x")
    (root / "quality.json").write_text('{"mini_version": "some-older-version", "targets": {}}')
    assert not is_built(root, "last")  # another version: rebuilt, never reused


def test_a_mini_pair_trained_in_another_dtype_is_reused_with_one_line(tmp_path, monkeypatch, capsys):
    from steercmp_plugins.nla.mini import ensure_mini_pair, mini_dir, mini_name

    monkeypatch.setenv("STEERCMP_CACHE", str(tmp_path))
    monkeypatch.setenv("STEERCMP_DTYPE", "float32")
    root = mini_dir("last")
    for f in ("av/nla_meta.yaml", "ar/nla_meta.yaml", "ar/value_head.safetensors"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x")
    quality = {"mini_version": mini_name("last"), "targets": {}, "train_dtype": "bfloat16"}
    (root / "quality.json").write_text(json.dumps(quality))
    assert ensure_mini_pair(progress=False, position="last") == (root / "av", root / "ar")  # no rebuild
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "trained in bfloat16" in said[0] and "build-mini --force" in said[0]
    quality["train_dtype"] = "float32"
    (root / "quality.json").write_text(json.dumps(quality))
    ensure_mini_pair(progress=False, position="last")
    assert capsys.readouterr().err == ""  # the same dtype: nothing to say
