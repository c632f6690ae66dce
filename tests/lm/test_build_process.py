"""Builders in a fresh process: the result, the builder's own error and a dead child all come
back to the run, and the child's peak memory is recorded for the runner."""

from __future__ import annotations

import os
import pickle

import pytest

from steercmp.errors import ConfigError, SteercmpError
from steercmp.lm.build_process import build_peaks, in_fresh_process
from steercmp.paths import writable_file
from steercmp.run.proposals import ProposalError


def test_the_result_comes_from_another_process_and_its_peak_is_recorded() -> None:
    build_peaks()
    assert in_fresh_process("a test build", os.getpid) != os.getpid()
    (what, peak), = build_peaks()
    assert what == "a test build" and peak > 10 * 2**20
    assert build_peaks() == []  # read once


def test_the_builders_error_arrives_whole(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        in_fresh_process("a test build", writable_file, tmp_path)  # a directory: refused
    assert err.value.fix and err.value.where == str(tmp_path)
    assert "is a directory" in str(err.value)


def test_a_child_that_dies_is_one_line_naming_the_build() -> None:
    with pytest.raises(SteercmpError, match=r"the process building the test SAE ended without a result \(exit code -6"):
        in_fresh_process("the test SAE", os.abort)


def test_every_steercmp_error_pickles_with_its_fields() -> None:
    err = pickle.loads(pickle.dumps(ConfigError("bad", where="a.b", fix="use c")))
    assert (str(err), err.where, err.fix) == ("a.b: bad; fix: use c", "a.b", "use c")
    prop = pickle.loads(pickle.dumps(ProposalError("finite", "a NaN", fix="check it")))
    assert (type(prop), prop.check, str(prop)) == (ProposalError, "finite", "a NaN; fix: check it")


def test_the_runner_records_a_build_process_under_the_stage_that_started_it() -> None:
    from steercmp.run.runtime import ResourceManager

    said: list[str] = []
    resources = ResourceManager(None, False, said.append)  # no model is loaded here
    build_peaks()
    in_fresh_process("a test build", os.getpid)
    resources.note("propose")
    resources.note("score")
    first, second = resources.memory
    assert [b["what"] for b in first["build_processes"]] == ["a test build"]
    assert first["build_processes"][0]["peak_rss_bytes"] > 0 and "build_processes" not in second
    assert "build process (a test build) peak=" in said[0] and "build process" not in said[1]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")
def test_a_builder_dies_with_a_run_killed_by_sigkill() -> None:
    import signal
    import subprocess
    import sys
    import time

    run = subprocess.Popen([sys.executable, "-c", "import time; from steercmp.lm.build_process import "
                            "in_fresh_process; in_fresh_process('a test build', time.sleep, 120)"])
    try:
        builder = None
        for _ in range(300):  # the child has started once its command line names the module
            for pid in _children(run.pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        if b"steercmp.lm.build_process" in fh.read():
                            builder = pid
                except OSError:
                    continue
            if builder is not None:
                break
            time.sleep(0.1)
        assert builder is not None, "the build process never started"
        time.sleep(1.0)  # past its start-up, into the build
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        for _ in range(100):
            if not _alive(builder):
                break
            time.sleep(0.1)
        assert not _alive(builder), "the builder outlived the run"
    finally:
        run.kill()


def test_an_os_error_keeps_its_errno(tmp_path) -> None:
    """build_lock turns a full disk (ENOSPC) raised by the builder into one line: the errno must
    survive the trip back from the child."""
    import errno

    with pytest.raises(FileNotFoundError) as err:
        in_fresh_process("a test build", os.mkdir, str(tmp_path / "no" / "such" / "parent"))
    assert err.value.errno == errno.ENOENT


def test_a_users_script_without_a_main_guard_runs_once(tmp_path) -> None:
    """The child never re-imports the caller's main script (a multiprocessing spawn would: a
    script that starts a run at top level would start a second one there)."""
    import subprocess
    import sys

    script = tmp_path / "my_experiment.py"
    script.write_text("import os\nfrom steercmp.lm.build_process import in_fresh_process\n"
                      "print('top level', flush=True)\nprint('built in', in_fresh_process('x', os.getpid))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("top level") == 1 and "built in" in done.stdout
    assert "Warning" not in done.stderr, done.stderr
